//! The engine on PostgreSQL for in-process tests: a server on a fresh schema of the
//! database named by `CAIRN_TEST_PG_URL` (default: the local server's `test` database).
//! Without a reachable server the tests using it fail rather than skip.
// Each test binary uses its own part of these helpers.
#![allow(dead_code)]

use super::common::TestServer;
use cairn_server::store::{PgOptions, PostgresStore};
use cairn_server::{Config, Server};
use std::sync::Arc;
use std::time::Duration;

pub fn pg_url() -> String {
    std::env::var("CAIRN_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A dev-mode server on a schema of its own; returns it with the schema's name.
pub async fn pg_server() -> (TestServer, String) {
    let schema = format!(
        "cairn_test_{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    let opts = PgOptions {
        pool_size: 8,
        schema: Some(schema.clone()),
        ..Default::default()
    };
    let store = match PostgresStore::connect(&pg_url(), opts).await {
        Ok(s) => Arc::new(s),
        Err(e) => panic!(
            "engine tests on PostgreSQL need a server ({}; set CAIRN_TEST_PG_URL or start it): {e}",
            pg_url()
        ),
    };
    let mut cfg = Config::dev("127.0.0.1:0".parse().unwrap());
    cfg.retry_interval = Some(Duration::from_millis(100));
    let server = Server::start(cfg, store).await.unwrap();
    let base = format!("http://{}", server.addr());
    let server = TestServer {
        server,
        base,
        http: reqwest::Client::new(),
        _dir: tempfile::tempdir().unwrap(),
    };
    (server, schema)
}

/// Stop the server and drop its schema.
pub async fn finish(server: TestServer, schema: String) {
    server.server.shutdown().await;
    let (client, conn) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .unwrap();
}

/// Another node on `schema` (as a second `cairn` process sharing the database would be),
/// with its own pool; returns it with its base URL.
pub async fn another_node(schema: &str, cfg: Config) -> (Server, String) {
    let store = PostgresStore::connect(
        &pg_url(),
        PgOptions {
            pool_size: 4,
            schema: Some(schema.to_string()),
            ..Default::default()
        },
    )
    .await
    .expect("second node's store");
    let server = Server::start(cfg, Arc::new(store)).await.unwrap();
    let base = format!("http://{}", server.addr());
    (server, base)
}
