//! The founding leak in Rust. Every call's step handle (or, with `LEAK_STASH=ctx`, the whole
//! `Ctx`) is pushed onto a global list and never removed: the pattern that pinned ~2 MiB a
//! run in inngest-js. A counting global allocator reports the live heap at `GET /heap`, so
//! the bench can divide the growth by the number of runs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use axum::routing::get;
use serde_json::json;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[tokio::main]
async fn main() {
    let heap = axum::Router::new().route(
        "/heap",
        get(|| async {
            let stashed = cairn_bench_app::STASH.lock().unwrap().len();
            axum::Json(json!({ "live_bytes": LIVE.load(Ordering::SeqCst), "stashed": stashed }))
        }),
    );
    // LEAK_STASH=ctx keeps whole contexts; the default keeps step handles.
    let whole_ctx = std::env::var("LEAK_STASH").is_ok_and(|v| v == "ctx");
    cairn_bench_app::serve("bench-leak-rust", Some(whole_ctx), false, heap).await;
}
