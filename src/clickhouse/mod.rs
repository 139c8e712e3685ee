//! Everything that talks to ClickHouse: the client, the schema, the row format, and how its
//! errors are told apart (retry later, or the data itself is bad).

pub mod native;
pub mod rowbinary;
pub mod schema;

use crate::config::ClickHouseSettings;

/// A client for the configured server and database. Inserts are LZ4-compressed, said
/// explicitly: the crate's default is no compression when its test utilities are compiled in
/// (as they are for this crate's tests), and the tests should send what production sends.
pub fn client(url: &str, settings: &ClickHouseSettings) -> clickhouse::Client {
    clickhouse::Client::default()
        .with_compression(clickhouse::Compression::Lz4)
        .with_url(url)
        .with_user(&settings.user)
        .with_password(&settings.password)
        .with_database(&settings.database)
}

/// `query` as a read that cannot write, stopped by ClickHouse after `max_execution_ms` and
/// also when the service goes away (its client went away, or it gave up waiting): ClickHouse
/// honours `cancel_http_readonly_queries_on_client_close` only for read-only statements.
pub fn bounded_read(
    query: clickhouse::query::Query,
    max_execution_ms: u64,
) -> clickhouse::query::Query {
    query
        .with_setting("readonly", "2")
        .with_setting("cancel_http_readonly_queries_on_client_close", "1")
        .with_setting(
            "max_execution_time",
            format!("{:.3}", max_execution_ms as f64 / 1000.0),
        )
}

/// `INSERT INTO <table> (<column>, ...) FORMAT <format>`.
pub fn insert_sql(table: &str, columns: &[(&str, &str)], format: &str) -> String {
    let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
    format!("INSERT INTO {table} ({}) FORMAT {format}", names.join(", "))
}

/// The `Code: N` of a ClickHouse exception, if the error carries one.
pub fn error_code(err: &clickhouse::error::Error) -> Option<u32> {
    let clickhouse::error::Error::BadResponse(text) = err else {
        return None;
    };
    let from = text.find("Code: ")? + "Code: ".len();
    let digits: String = text[from..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Error codes meaning "these rows can never be inserted as they are": retrying would fail
/// forever, so such a batch is split to find the bad rows, which go to the dead-letter file.
/// Everything else (network, timeouts, memory, too many parts, missing table while someone
/// fixes the schema) is retried with backoff.
const DATA_ERROR_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,  // CANNOT_READ_ALL_DATA
    36,  // BAD_ARGUMENTS
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    321, // VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    349, // CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    469, // VIOLATED_CONSTRAINT
    691, // UNKNOWN_ELEMENT_OF_ENUM
];

pub fn is_data_error(err: &clickhouse::error::Error) -> bool {
    error_code(err).is_some_and(|code| DATA_ERROR_CODES.contains(&code))
}

/// Error codes meaning "not now": the server is overloaded, read-only, missing the table while
/// someone fixes the schema, refusing this user, or cannot reach its coordination service.
/// They say nothing about the rows or how they were sent.
const NOT_NOW_CODES: &[u32] = &[
    60,  // UNKNOWN_TABLE
    81,  // UNKNOWN_DATABASE
    159, // TIMEOUT_EXCEEDED
    164, // READONLY
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    203, // NO_FREE_CONNECTION
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    225, // NO_ZOOKEEPER
    236, // ABORTED
    241, // MEMORY_LIMIT_EXCEEDED
    242, // TABLE_IS_READ_ONLY
    243, // NOT_ENOUGH_SPACE
    252, // TOO_MANY_PARTS
    319, // UNKNOWN_STATUS_OF_INSERT
    394, // QUERY_WAS_CANCELLED
    439, // CANNOT_SCHEDULE_TASK
    497, // ACCESS_DENIED
    516, // AUTHENTICATION_FAILED
    999, // KEEPER_EXCEPTION
];

/// Whether ClickHouse answered with an exception that may be about what was sent (anything
/// but "not now"). An answer without an exception code (a proxy's 502, say) is not.
pub fn refused_what_was_sent(err: &clickhouse::error::Error) -> bool {
    error_code(err).is_some_and(|code| !NOT_NOW_CODES.contains(&code))
}

/// For unit tests of what the service sends ClickHouse.
#[cfg(test)]
pub mod testing {
    use std::{future::Future, time::Duration};

    use tokio::io::AsyncReadExt;

    /// The request line of the first request `send` makes to the URL it is given, where
    /// nothing answers (`send` is given a moment, then dropped).
    pub async fn first_request_line<F: Future>(send: impl FnOnce(String) -> F) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let head = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = vec![0; 64 << 10];
            let n = conn.read(&mut head).await.unwrap();
            String::from_utf8_lossy(&head[..n]).into_owned()
        });
        let _ = tokio::time::timeout(Duration::from_millis(500), send(url)).await;
        let head = head.await.unwrap();
        head.lines().next().unwrap_or_default().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickhouse::error::Error;

    #[tokio::test]
    async fn inserts_are_compressed_as_in_production() {
        let line = testing::first_request_line(|url| async move {
            let settings = ClickHouseSettings {
                target: crate::config::ClickHouseTarget::Url(url.clone()),
                database: "db".into(),
                user: "default".into(),
                password: String::new(),
                apply_schema: false,
            };
            let mut insert =
                client(&url, &settings).insert_formatted_with("INSERT INTO t FORMAT RowBinary");
            insert.send(bytes::Bytes::from_static(b"row")).await?;
            insert.end().await
        })
        .await;
        assert!(line.contains("decompress=1"), "{line}");
    }

    #[test]
    fn codes_are_read_from_the_exception_text() {
        let err = Error::BadResponse("Code: 27. DB::Exception: Cannot parse input".into());
        assert_eq!(error_code(&err), Some(27));
        assert!(is_data_error(&err));
        let err = Error::BadResponse("Code: 252. DB::Exception: Too many parts".into());
        assert!(!is_data_error(&err));
        assert!(!is_data_error(&Error::Network("connection refused".into())));
    }

    #[test]
    fn only_an_exception_that_is_not_about_load_may_be_about_what_was_sent() {
        let refused = |text: &str| refused_what_was_sent(&Error::BadResponse(text.into()));
        assert!(refused("Code: 33. DB::Exception: Cannot read all data"));
        assert!(refused("Code: 62. DB::Exception: Syntax error"));
        assert!(!refused("Code: 252. DB::Exception: Too many parts"));
        assert!(!refused("Code: 241. DB::Exception: Memory limit exceeded"));
        assert!(!refused("502 Bad Gateway"));
        assert!(!refused_what_was_sent(&Error::Network("reset".into())));
        assert!(!refused_what_was_sent(&Error::TimedOut));
    }
}
