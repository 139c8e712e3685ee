//! The HTTP server: a few request threads, each a single-threaded tokio runtime that serves
//! the connections handed to it, fed by one accept loop that deals connections out in turn.
//!
//! Why not tokio's multi-threaded runtime: a request costs so little (tens of µs for one
//! event) that the runtime's sharing between workers (stealing tasks, waking a sleeping
//! worker for new ones, a request read on one core and answered on another) was a large part
//! of it. With one runtime per thread a connection's requests stay on the thread that reads
//! them (A/B, see BENCHMARKS.md: 5–14 % less CPU per single-event request, a quarter less per
//! 100-event batch). Work is not moved to another thread by itself, so what is long is moved
//! explicitly: [`cpu_bound`] decompresses and parses large bodies off the request thread.
//! Connections are long-lived behind a load balancer, so dealing them out in turn keeps the
//! threads evenly loaded. A streamed answer that fails midway cuts its connection off
//! ([`streamed_body`]): it must not end like a complete one.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, LazyLock, Mutex,
    },
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use anyhow::Context;
use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use poem::{
    http::{uri::Scheme, Version},
    web::{LocalAddr, RemoteAddr},
    Addr, Body, Endpoint, Request,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{mpsc, watch, Notify},
};
use tokio_util::task::TaskTracker;

/// How long a graceful stop waits for open requests before closing their connections.
const GRACE: Duration = Duration::from_secs(10);

/// Inputs at least this large are worked on off the request thread (see [`cpu_bound`]): about
/// 1.5 ms of parsing or decompressing here.
pub const OFF_THREAD_BYTES: usize = 256 << 10;

/// Runs `work`, CPU-bound over `input_bytes` of input, where it does not hold up the other
/// connections of this request thread: at once when the input is small, on the runtime's
/// blocking pool when it is [`OFF_THREAD_BYTES`] or more (a 10 MB batch takes tens of ms to
/// decompress and parse; meanwhile the thread goes on serving its other connections, and the
/// kernel shares the cores between the two). A panic in `work` goes on in the caller.
pub async fn cpu_bound<T: Send + 'static>(
    input_bytes: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    if input_bytes < OFF_THREAD_BYTES {
        return work();
    }
    match tokio::task::spawn_blocking(work).await {
        Ok(out) => out,
        Err(err) => match err.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(err) => panic!("work off the request thread did not finish: {err}"),
        },
    }
}

/// Threads of each request thread's blocking pool, where large bodies are parsed.
const BLOCKING_THREADS: usize = 2;

/// A connection accepted on the main runtime, not yet registered with any reactor.
type Accepted = (std::net::TcpStream, SocketAddr);

/// Serves `routes` on `threads` request threads until `shutdown` completes, then stops
/// accepting, lets open requests finish (up to [`GRACE`]) and returns once every request
/// thread has ended, so that `routes` (and every handle it holds) is dropped by then.
///
/// Returns an error, without waiting for `shutdown`, if a request thread ends by itself.
pub async fn serve<E>(
    listener: std::net::TcpListener,
    routes: E,
    threads: usize,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()>
where
    E: Endpoint + 'static,
{
    let local = listener.local_addr()?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let routes = Arc::new(routes);
    let (stop, stop_rx) = watch::channel(false);
    let ended = Arc::new(Notify::new());
    let mut queues = Vec::with_capacity(threads);
    let mut handles = Vec::with_capacity(threads);
    for i in 0..threads.max(1) {
        let (queue, connections) = mpsc::unbounded_channel();
        queues.push(queue);
        let thread = RequestThread {
            acceptor: Handoff { local, connections },
            routes: routes.clone(),
            stop: stop_rx.clone(),
            ended: EndedGuard(ended.clone()),
        };
        let handle = std::thread::Builder::new()
            .name(format!("http-{i}"))
            .spawn(move || thread.run())
            .context("starting a request thread")?;
        handles.push(handle);
    }
    drop(routes);

    tokio::select! {
        () = shutdown => {}
        () = deal_out(&listener, &queues) => {}
        () = ended.notified() => tracing::error!("a request thread ended by itself; stopping"),
    }
    drop(listener);
    stop.send_replace(true);
    drop(queues);
    let results = tokio::task::spawn_blocking(move || {
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a request thread panicked")))
            })
            .collect::<Vec<_>>()
    })
    .await?;
    results.into_iter().collect()
}

/// Accepts forever, giving each connection to the next request thread in turn.
async fn deal_out(listener: &tokio::net::TcpListener, queues: &[mpsc::UnboundedSender<Accepted>]) {
    let mut next = 0;
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => match stream.into_std() {
                Ok(stream) => {
                    // A closed queue means its thread has ended; `serve` notices that itself.
                    let _ = queues[next].send((stream, remote));
                    next = (next + 1) % queues.len();
                }
                Err(err) => tracing::warn!(error = %err, "could not hand over a connection"),
            },
            Err(err) => {
                // Out of file descriptors and the like: retrying at once would spin.
                tracing::warn!(error = %err, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

struct RequestThread<E> {
    acceptor: Handoff,
    routes: Arc<E>,
    stop: watch::Receiver<bool>,
    ended: EndedGuard,
}

impl<E: Endpoint + 'static> RequestThread<E> {
    fn run(self) -> anyhow::Result<()> {
        let Self {
            mut acceptor,
            routes,
            mut stop,
            ended,
        } = self;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            // Only large bodies go to the blocking pool ([`cpu_bound`]): a few at a time per
            // request thread keep the cores busy, and more would only hold more of them in
            // memory at once (each parse adds about half its body in rows).
            .max_blocking_threads(BLOCKING_THREADS)
            .build()
            .context("starting a request thread's runtime")?;
        runtime.block_on(async move {
            let open = TaskTracker::new();
            loop {
                let accepted = tokio::select! {
                    _ = stop.wait_for(|stop| *stop) => break,
                    accepted = acceptor.accept() => accepted,
                };
                match accepted {
                    Ok(Some(connection)) => {
                        open.spawn(serve_connection(connection, routes.clone(), stop.clone()));
                    }
                    Ok(None) => break,
                    Err(err) => tracing::warn!(error = %err, "could not take a connection"),
                }
            }
            // Connections dealt to this thread but not taken yet are closed now, not after
            // the grace period: their clients (nginx) can try another instance at once.
            drop(acceptor);
            open.close();
            if tokio::time::timeout(GRACE, open.wait()).await.is_err() {
                tracing::warn!(
                    open = open.len(),
                    "closing connections still open after the grace period"
                );
            }
        });
        // Connections still open after the grace period are closed with the runtime.
        drop(runtime);
        drop(ended);
        Ok(())
    }
}

/// Serves one connection's requests (HTTP/1.1, keep-alive) until the client closes it, or,
/// once `stop` is set, until its request in progress is answered (hyper closes an idle
/// connection, or one that has not sent anything yet, at once).
///
/// poem's own server loop does the same through several layers made for its general case (a
/// boxed connection split into two locked halves, HTTP/1-or-2 detection, cancellation tokens
/// polled at every wake-up, a boxed future per request); serving the routes with hyper
/// directly is about 8 % less CPU per single-event request (BENCHMARKS.md). Requests and
/// answers are converted exactly as poem's loop converts them. The service speaks HTTP/1.1
/// only (nginx talks to it in HTTP/1.1).
async fn serve_connection<E: Endpoint + 'static>(
    accepted: AcceptedConnection,
    routes: Arc<E>,
    mut stop: watch::Receiver<bool>,
) {
    let AcceptedConnection {
        stream,
        local,
        remote,
    } = accepted;
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let routes = routes.clone();
        let req = Request::from((req, local.clone(), remote.clone(), Scheme::HTTP));
        async move {
            let answer = routes.get_response(req).await;
            Ok::<_, std::convert::Infallible>(hyper::Response::from(answer))
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        // Head and body in one buffer, one `write` (as poem's loop does): cheaper than
        // `writev` for the small answers of this service.
        .writev(false)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        biased;
        served = connection.as_mut() => {
            if let Err(err) = served {
                tracing::debug!(error = %err, "connection ended with an error");
            }
            return;
        }
        _ = stop.wait_for(|stop| *stop) => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

/// Tells `serve` when a request thread ends, however it ends (a panic included).
struct EndedGuard(Arc<Notify>);

impl Drop for EndedGuard {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// Where one request thread takes its connections from: those dealt to it by [`deal_out`].
struct Handoff {
    local: SocketAddr,
    connections: mpsc::UnboundedReceiver<Accepted>,
}

/// A connection taken by a request thread, registered with its runtime.
struct AcceptedConnection {
    stream: Connection,
    local: LocalAddr,
    remote: RemoteAddr,
}

impl Handoff {
    /// The next connection; `None` once the accept loop has stopped dealing them out.
    async fn accept(&mut self) -> io::Result<Option<AcceptedConnection>> {
        let Some((stream, remote)) = self.connections.recv().await else {
            return Ok(None);
        };
        let id = ConnectionId {
            local: self.local,
            remote,
        };
        Ok(Some(AcceptedConnection {
            stream: Connection::new(TcpStream::from_std(stream)?, id),
            local: LocalAddr(self.local.into()),
            remote: RemoteAddr(remote.into()),
        }))
    }
}

/// The abort switch of each open connection (see [`streamed_body`]).
static ABORT_SWITCHES: LazyLock<Mutex<HashMap<ConnectionId, Arc<AtomicBool>>>> =
    LazyLock::new(Default::default);

/// A connection: the listener's address and the client's (unique among open connections of
/// the process, though one client address may talk to several listeners).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnectionId {
    local: SocketAddr,
    remote: SocketAddr,
}

impl ConnectionId {
    /// The HTTP/1 connection `req` came on. `None` for HTTP/2 (not served today), where a
    /// failing body resets only its own stream and cutting the connection off would fail the
    /// others.
    fn of(req: &Request) -> Option<Self> {
        if req.version() >= Version::HTTP_2 {
            return None;
        }
        match (&req.local_addr().0, &req.remote_addr().0) {
            (Addr::SocketAddr(local), Addr::SocketAddr(remote)) => Some(Self {
                local: *local,
                remote: *remote,
            }),
            _ => None,
        }
    }

    /// From now on, every write to this connection fails: hyper gives up on it and it closes.
    fn abort(&self) {
        let switches = ABORT_SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
        match switches.get(self) {
            Some(aborted) => aborted.store(true, Ordering::Relaxed),
            None => tracing::debug!(connection = ?self, "no open connection to cut off"),
        }
    }
}

/// A streamed body for the answer to `req`: should `chunks` fail, the connection is cut off
/// where it is, so that the client sees a broken transfer. An error from the body alone is
/// not always enough: a connection polled once more after its body failed (as poem's server
/// loop did) has hyper write the chunked body's end marker, and the client would take the
/// cut-off answer for a complete one. [`serve_connection`] stops at the error; the switch keeps
/// the answer cut off whatever drives the connection.
pub fn streamed_body<S>(req: &Request, chunks: S) -> Body
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    let connection = ConnectionId::of(req);
    Body::from_bytes_stream(chunks.inspect_err(move |_| {
        if let Some(connection) = &connection {
            connection.abort();
        }
    }))
}

/// A served connection's socket, which refuses every write once its connection was cut off
/// (see [`streamed_body`]).
pub struct Connection {
    stream: TcpStream,
    id: ConnectionId,
    aborted: Arc<AtomicBool>,
}

impl Connection {
    fn new(stream: TcpStream, id: ConnectionId) -> Self {
        let aborted = Arc::new(AtomicBool::new(false));
        let mut switches = ABORT_SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
        switches.insert(id, aborted.clone());
        Self {
            stream,
            id,
            aborted,
        }
    }

    fn refused(&self) -> Option<io::Error> {
        self.aborted.load(Ordering::Relaxed).then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the answer failed while it was being sent",
            )
        })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut switches = ABORT_SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
        if switches
            .get(&self.id)
            .is_some_and(|a| Arc::ptr_eq(a, &self.aborted))
        {
            switches.remove(&self.id);
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(err) = self.refused() {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(err) = self.refused() {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(
        client: &reqwest::Client,
        addr: SocketAddr,
    ) -> impl Future<Output = reqwest::Result<String>> {
        let request = client.get(format!("http://{addr}/")).send();
        async move { request.await?.text().await }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn large_inputs_are_worked_on_off_the_request_thread() {
        let here = std::thread::current().id();
        let on = |bytes| cpu_bound(bytes, || std::thread::current().id());
        assert_eq!(on(OFF_THREAD_BYTES - 1).await, here);
        assert_ne!(on(OFF_THREAD_BYTES).await, here);
        let panicked = tokio::spawn(cpu_bound(OFF_THREAD_BYTES, || panic!("bad input")));
        assert!(
            panicked.await.unwrap_err().is_panic(),
            "a panic is not lost"
        );
    }

    #[tokio::test]
    async fn connections_are_dealt_to_the_threads_in_turn_and_all_stop_together() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let held = Arc::new(());
        let routes = {
            let held = held.clone();
            poem::endpoint::make_sync(move |_| {
                let _held = &held;
                std::thread::current()
                    .name()
                    .unwrap_or_default()
                    .to_string()
            })
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, routes, 2, async {
            let _ = stopped.await;
        }));

        // One client per connection: each keeps its connection, so each stays on a thread.
        let clients: Vec<_> = (0..4).map(|_| reqwest::Client::new()).collect();
        let mut first = Vec::new();
        for client in &clients {
            first.push(get(client, addr).await.unwrap());
        }
        assert_eq!(first, ["http-0", "http-1", "http-0", "http-1"]);
        for (client, thread) in clients.iter().zip(&first) {
            assert_eq!(&get(client, addr).await.unwrap(), thread);
        }

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        assert_eq!(
            Arc::strong_count(&held),
            1,
            "the routes outlived the server"
        );
        let fresh = reqwest::Client::new();
        assert!(get(&fresh, addr).await.is_err(), "still accepting");
    }

    #[tokio::test]
    async fn idle_and_silent_connections_do_not_hold_up_the_stop() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let routes = poem::endpoint::make_sync(|_| "ok");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, routes, 1, async {
            let _ = stopped.await;
        }));
        // A client that connects and says nothing (a TCP probe, a browser's preconnect), and
        // one that has been served and keeps its connection open.
        let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let client = reqwest::Client::new();
        assert_eq!(get(&client, addr).await.unwrap(), "ok");
        tokio::time::sleep(Duration::from_millis(100)).await;

        stop.send(()).unwrap();
        let ended = tokio::time::timeout(GRACE / 2, server).await;
        assert!(
            ended.is_ok(),
            "the stop waited for an idle or a silent connection"
        );
        drop(silent);
    }

    #[tokio::test]
    async fn an_answer_whose_body_fails_midway_is_cut_off_not_ended() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let routes = poem::endpoint::make(|req: poem::Request| async move {
            let fails = req.uri().path() == "/fails";
            let lines = futures_util::stream::unfold(0, move |n| async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                match n {
                    0 => Some((Ok(Bytes::from("first line\n")), 1)),
                    1 if fails => Some((Err(io::Error::other("the source failed")), 2)),
                    _ => None,
                }
            });
            streamed_body(&req, lines)
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, routes, 1, async {
            let _ = stopped.await;
        }));

        // The answer, and the client's address (with `addr`, its connection's key).
        let answer = |path: &'static str| async move {
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
            conn.write_all(request.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let _ = conn.read_to_end(&mut answer).await;
            (
                String::from_utf8(answer).unwrap(),
                conn.local_addr().unwrap(),
            )
        };
        let (whole, _) = answer("/works").await;
        assert!(whole.ends_with("first line\n\r\n0\r\n\r\n"), "{whole:?}");
        let (cut, client) = answer("/fails").await;
        assert!(cut.contains("first line\n"), "{cut:?}");
        assert!(
            !cut.ends_with("0\r\n\r\n"),
            "ended like a complete answer: {cut:?}"
        );
        let id = ConnectionId {
            local: addr,
            remote: client,
        };
        let remembered = ABORT_SWITCHES.lock().unwrap().contains_key(&id);
        assert!(!remembered, "a closed connection is forgotten");

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn http2_connections_are_not_cut_off_for_one_answer() {
        let request = |version| Request::builder().version(version).finish();
        assert!(ConnectionId::of(&request(Version::HTTP_2)).is_none());
    }
}
