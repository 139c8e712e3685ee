//! One response enum shared by several operations, documented per operation with only the
//! statuses that operation can answer.
//!
//! The analytics and admin operations share their response enums (`AnalyticsResponse`,
//! `AdminResponse`), so that every error has one shape and one mapping. Listed as they are,
//! every operation would document every status of its enum: a `409 tenant exists` on listing
//! keys, a `415` on a `GET`. [`Documented`] answers exactly as the enum does and leaves out of
//! the OpenAPI document the statuses its marker names: those the operation never answers.
//! (The other direction is harmless and not attempted: an operation may still document a
//! status it has no path to.) A debug build checks every answer against its marker, so the
//! tests catch an operation that starts answering a status its document leaves out.

use std::marker::PhantomData;

use poem::IntoResponse;
use poem_openapi::{registry::MetaResponses, registry::Registry, ApiResponse};

/// The statuses an operation never answers.
pub trait Unanswered: Send + Sync {
    const STATUSES: &'static [u16];
}

/// `R`, documented without the statuses `Hidden` names.
pub struct Documented<R, Hidden>(R, PhantomData<Hidden>);

impl<R, S> From<R> for Documented<R, S> {
    fn from(response: R) -> Self {
        Self(response, PhantomData)
    }
}

impl<R: ApiResponse, S: Unanswered> ApiResponse for Documented<R, S> {
    const BAD_REQUEST_HANDLER: bool = R::BAD_REQUEST_HANDLER;

    fn meta() -> MetaResponses {
        let mut meta = R::meta();
        meta.responses
            .retain(|r| r.status.is_none_or(|status| !S::STATUSES.contains(&status)));
        meta
    }

    fn register(registry: &mut Registry) {
        R::register(registry);
    }

    fn from_parse_request_error(err: poem::Error) -> Self {
        R::from_parse_request_error(err).into()
    }
}

impl<R: IntoResponse, S: Unanswered> IntoResponse for Documented<R, S> {
    fn into_response(self) -> poem::Response {
        let response = self.0.into_response();
        debug_assert!(
            !S::STATUSES.contains(&response.status().as_u16()),
            "answered {}, which the operation's document leaves out",
            response.status()
        );
        response
    }
}

/// Declares a marker type for [`Documented`], e.g. `unanswered!(/** doc */ pub ById: 413, 415)`.
macro_rules! unanswered {
    ($(#[$doc:meta])* $vis:vis $name:ident: $($status:literal),+) => {
        $(#[$doc])*
        $vis struct $name;
        impl $crate::api::documented::Unanswered for $name {
            const STATUSES: &'static [u16] = &[$($status),+];
        }
    };
}
pub(crate) use unanswered;

#[cfg(test)]
mod tests {
    use poem_openapi::payload::Json;

    use super::*;

    #[derive(ApiResponse)]
    #[allow(dead_code)] // only one variant is answered; the others are documentation
    enum Shared {
        #[oai(status = 200)]
        Ok(Json<u32>),
        #[oai(status = 409)]
        Conflict(Json<u32>),
        #[oai(status = 415)]
        Unsupported(Json<u32>),
    }

    unanswered!(Hidden: 409, 415);

    #[test]
    fn the_named_statuses_are_left_out_of_the_document() {
        let statuses: Vec<_> = Documented::<Shared, Hidden>::meta()
            .responses
            .iter()
            .map(|r| r.status)
            .collect();
        assert_eq!(statuses, [Some(200)]);
        let response = Documented::<_, Hidden>::from(Shared::Ok(Json(1))).into_response();
        assert_eq!(response.status(), 200);
    }

    #[test]
    #[should_panic(expected = "answered 409 Conflict, which the operation's document leaves out")]
    fn a_debug_build_refuses_to_answer_a_hidden_status() {
        let _ = Documented::<_, Hidden>::from(Shared::Conflict(Json(1))).into_response();
    }
}
