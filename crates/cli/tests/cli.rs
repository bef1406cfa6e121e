//! Argument checks and start-up failures of the `cairn` binary.

use std::process::Command;

fn cairn(args: &[&str], dir: &std::path::Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .current_dir(dir)
        .env_remove("CAIRN_SIGNING_KEY")
        .env_remove("CAIRN_EVENT_KEY")
        .output()
        .expect("run cairn");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn start_requires_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (code, text) = cairn(&["start", "--port", "0"], dir.path());
    assert_ne!(code, 0);
    assert!(text.contains("--signing-key"), "{text}");
    let (code, text) = cairn(
        &["start", "--port", "0", "--signing-key", "signkey-prod-abcd"],
        dir.path(),
    );
    assert_ne!(code, 0);
    assert!(text.contains("--event-key"), "{text}");
    let (code, text) = cairn(
        &[
            "start",
            "--port",
            "0",
            "--signing-key",
            "xyz",
            "--event-key",
            "k",
        ],
        dir.path(),
    );
    assert_ne!(code, 0);
    assert!(text.contains("hex"), "{text}");
}

#[test]
fn corrupt_or_foreign_database_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bad.db");
    std::fs::write(&db, b"this is not a sqlite database, not even close....").unwrap();
    let url = format!("sqlite://{}", db.display());
    let (code, text) = cairn(&["dev", "--port", "0", "--database-url", &url], dir.path());
    assert_ne!(code, 0);
    assert!(text.contains("database"), "{text}");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        b"this is not a sqlite database, not even close...."
    );

    let (code, text) = cairn(
        &["dev", "--port", "0", "--database-url", "postgres://x/y"],
        dir.path(),
    );
    assert_ne!(code, 0);
    assert!(text.contains("PostgreSQL"), "{text}");
}
