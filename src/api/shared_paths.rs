//! Lets two `#[OpenApi]` impls serve different methods of one path (`POST /v1/events` for
//! ingestion, `GET /v1/events` for reading) and still give a valid OpenAPI document.
//!
//! poem-openapi routes such a pair correctly (its route table is keyed by path, then method),
//! but writes the path once per impl into the document's `paths` object: a JSON object with a
//! duplicate key, of which readers keep only the last. This wrapper merges the operations of
//! equal paths before the document is written.

use std::collections::HashMap;

use poem::{endpoint::BoxEndpoint, http::Method};
use poem_openapi::{
    registry::{MetaApi, MetaPath, Registry},
    OpenApi,
};

/// An API (typically a tuple of APIs) whose equal paths appear once in the document.
pub struct SharedPaths<T>(pub T);

impl<T: OpenApi> OpenApi for SharedPaths<T> {
    fn meta() -> Vec<MetaApi> {
        let mut apis = T::meta();
        let mut seen: HashMap<String, (usize, usize)> = HashMap::new();
        for a in 0..apis.len() {
            let paths = std::mem::take(&mut apis[a].paths);
            for path in paths {
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
    }

    fn add_routes(self, route_table: &mut HashMap<String, HashMap<Method, BoxEndpoint<'static>>>) {
        self.0.add_routes(route_table);
    }
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
