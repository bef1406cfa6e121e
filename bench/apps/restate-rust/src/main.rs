//! The founding function as a Restate service: `Founding/run` takes `{"size": N}` and runs
//! three journaled `ctx.run` steps, the same work the Cairn apps do.
//!
//! * `collect-data`: N bytes of random text (random so that neither side's storage can
//!   compress it away);
//! * `digest`: the first 100 characters of it;
//! * `finalize`: `{"done": true}`.
//!
//! Listens on 127.0.0.1:$PORT (default 9080); the bench registers it with the admin API.

use restate_sdk::prelude::*;
use serde_json::{json, Value};

struct Founding;

#[restate_sdk::service(name = "Founding")]
impl Founding {
    #[handler]
    async fn run(&self, ctx: Context<'_>, input: Json<Value>) -> Result<Json<Value>, HandlerError> {
        let size = input
            .into_inner()
            .get("size")
            .and_then(Value::as_u64)
            .unwrap_or(1024) as usize;
        let big: String = ctx
            .run(|| async move { Ok(random_text(size)) })
            .name("collect-data")
            .await?;
        let digest: String = ctx
            .run(|| async move { Ok(big.chars().take(100).collect::<String>()) })
            .name("digest")
            .await?;
        let _done: Json<Value> = ctx
            .run(|| async { Ok(Json(json!({ "done": true }))) })
            .name("finalize")
            .await?;
        Ok(Json(json!({ "len": digest.len() })))
    }
}

/// Printable random text from a xorshift generator seeded by the clock: cheap, and not
/// compressible below ~6 bits a byte.
fn random_text(n: usize) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut w = x;
        for _ in 0..10 {
            if out.len() == n {
                break;
            }
            out.push(ALPHABET[(w & 63) as usize]);
            w >>= 6;
        }
    }
    String::from_utf8(out).expect("ascii")
}

#[tokio::main]
async fn main() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(9080);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    eprintln!("restate founding service on http://{addr}");
    HttpServer::new(Endpoint::builder().bind(Founding).build())
        .listen_and_serve(addr)
        .await;
}
