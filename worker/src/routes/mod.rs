//! The worker's HTTP surface: `POST /work` (from the master) besides `/health`, `/ready`
//! and `/metrics`.

mod work;

use axum::Router;
use axum::routing::post;

use crate::app::AppState;

/// The worker's own routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/work", post(work::accept))
        .with_state(state)
}
