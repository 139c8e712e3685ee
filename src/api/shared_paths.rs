//! Lets two `#[OpenApi]` impls serve different methods of one path (`POST /v1/events` for
//! ingestion, `GET /v1/events` for reading) and still give a valid OpenAPI document.
//!
//! poem-openapi routes such a pair correctly (its route table is keyed by path, then method),
//! but writes the path once per impl into the document's `paths` object: a JSON object with a
//! duplicate key, of which readers keep only the last. This wrapper merges the operations of
//! equal paths before the document is written.
//!
//! It also documents the guard's answers (401, 403, 429, 503; see `guard`) on every operation
//! that needs an API key: the guard answers them before any handler runs, so no handler's
//! response type lists them.

use std::collections::HashMap;

use poem::{endpoint::BoxEndpoint, http::Method};
use poem_openapi::{
    registry::{
        MetaApi, MetaHeader, MetaMediaType, MetaOperation, MetaPath, MetaResponse, MetaSchemaRef,
        Registry,
    },
    types::Type,
    OpenApi,
};

use super::types::ErrorBody;

/// An API (typically a tuple of APIs) whose equal paths appear once in the document.
pub struct SharedPaths<T>(pub T);

impl<T: OpenApi> OpenApi for SharedPaths<T> {
    fn meta() -> Vec<MetaApi> {
        let mut apis = T::meta();
        let mut seen: HashMap<String, (usize, usize)> = HashMap::new();
        for a in 0..apis.len() {
            let paths = std::mem::take(&mut apis[a].paths);
            for path in paths {
                let mut path = path;
                for op in &mut path.operations {
                    if !op.security.is_empty() {
                        document_guard(op);
                    }
                }
                match seen.get(&path.path) {
                    Some(&(ai, pi)) => apis[ai].paths[pi].operations.extend(path.operations),
                    None => {
                        seen.insert(path.path.clone(), (a, apis[a].paths.len()));
                        apis[a].paths.push(MetaPath {
                            path: path.path,
                            operations: path.operations,
                        });
                    }
                }
            }
        }
        apis
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
        ErrorBody::register(registry);
    }

    fn add_routes(self, route_table: &mut HashMap<String, HashMap<Method, BoxEndpoint<'static>>>) {
        self.0.add_routes(route_table);
    }
}

/// Adds the guard's responses the operation does not document itself.
fn document_guard(op: &mut MetaOperation) {
    let json = || {
        vec![MetaMediaType {
            content_type: "application/json; charset=utf-8",
            schema: MetaSchemaRef::Reference(ErrorBody::name().into_owned()),
        }]
    };
    let header = |name: &str, description: &str| MetaHeader {
        name: name.to_string(),
        description: Some(description.to_string()),
        required: true,
        deprecated: false,
        schema: u64::schema_ref(),
    };
    let guard_responses = [
        MetaResponse {
            description: "No API key (`missing_api_key`), or one that is unknown, malformed or revoked (`invalid_api_key`).",
            status: Some(401),
            status_range: None,
            content: json(),
            headers: vec![],
        },
        MetaResponse {
            description: "The key lacks the scope this operation needs (`insufficient_scope`).",
            status: Some(403),
            status_range: None,
            content: json(),
            headers: vec![],
        },
        MetaResponse {
            description: "The key is over its requests-per-second limit on this instance (`rate_limited`); retry after `Retry-After` seconds.",
            status: Some(429),
            status_range: None,
            content: json(),
            headers: vec![
                header("Retry-After", "Seconds to wait before retrying."),
                header("X-RateLimit-Limit", "Requests per second allowed for the key."),
                header("X-RateLimit-Remaining", "Requests left in the bucket now."),
                header("X-RateLimit-Reset", "Seconds until the bucket is full again."),
            ],
        },
        MetaResponse {
            description: "The key cannot be checked now: ClickHouse is unavailable and the key is not cached (`auth_unavailable`); retry.",
            status: Some(503),
            status_range: None,
            content: json(),
            headers: vec![header("Retry-After", "Seconds to wait before retrying.")],
        },
    ];
    for response in guard_responses {
        let documented = op
            .responses
            .responses
            .iter()
            .any(|r| r.status == response.status);
        if !documented {
            op.responses.responses.push(response);
        }
    }
    op.responses.responses.sort_by_key(|r| r.status);
}

#[cfg(test)]
mod tests {
    use super::*;
    use poem_openapi::{payload::PlainText, OpenApiService};

    struct Writes;
    struct Reads;

    #[OpenApi]
    impl Writes {
        #[oai(path = "/things", method = "post")]
        async fn post(&self) -> PlainText<&'static str> {
            PlainText("posted")
        }
    }

    #[OpenApi]
    impl Reads {
        #[oai(path = "/things", method = "get")]
        async fn get(&self) -> PlainText<&'static str> {
            PlainText("got")
        }
    }

    #[test]
    fn both_methods_of_a_shared_path_are_documented() {
        let spec = OpenApiService::new(SharedPaths((Writes, Reads)), "t", "1").spec();
        let doc: serde_json::Value = serde_json::from_str(&spec).unwrap();
        let ops = doc["paths"]["/things"].as_object().unwrap();
        assert!(
            ops.contains_key("get") && ops.contains_key("post"),
            "{spec}"
        );
        assert_eq!(spec.matches("\"/things\"").count(), 1, "{spec}");
    }
}
