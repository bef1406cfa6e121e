//! A real Rust SDK app on loopback for the tests that drive the server with `cairn-sdk`.

/// Serves a Rust SDK app on loopback: `build` gets a dev client pointed at `server_base`
/// (and announcing the app's own URL) and returns the app's router, with the SDK mounted at
/// `/api/inngest`. Returns that URL, to sync.
pub async fn serve_rust_app(
    app_id: &str,
    server_base: &str,
    build: impl FnOnce(cairn_sdk::Client) -> axum::Router,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let client = cairn_sdk::Client::builder(app_id)
        .dev(true)
        .base_url(server_base)
        .serve_origin(origin.clone())
        .serve_path("/api/inngest")
        .build()
        .unwrap();
    let app = build(client);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("{origin}/api/inngest")
}
