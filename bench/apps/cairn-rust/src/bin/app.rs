//! The benchmark app: the founding function, and its keyed variant for the flow scenario.

#[tokio::main]
async fn main() {
    cairn_bench_app::serve("bench-rust", None, true, axum::Router::new()).await;
}
