//! The benchmark app: the founding function, nothing else.

#[tokio::main]
async fn main() {
    cairn_bench_app::serve("bench-rust", None, axum::Router::new()).await;
}
