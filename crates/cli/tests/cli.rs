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

#[test]
fn sigterm_shuts_down_cleanly_and_dev_state_lives_in_dot_cairn() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    // Port 0, and the address read from what cairn prints once it listens: a port picked
    // here and handed over could be taken by a parallel test in between.
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["dev", "--port", "0"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let api = first
        .trim()
        .strip_prefix("cairn listening on ")
        .unwrap_or_else(|| panic!("first line: {first:?}"))
        .to_string();
    let addr = api.strip_prefix("http://").unwrap().to_string();
    assert!(std::net::TcpStream::connect(&addr).is_ok(), "{api} refuses");
    assert!(dir.path().join(".cairn/cairn.db").exists());
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cairn did not exit after SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit}");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
    assert!(out.contains("shutting down"), "{out}");
    assert!(api.starts_with("http://127.0.0.1:"), "{api}");
}
