//! The local AWS-compatible endpoint: moto from the project venv behind our launcher, which
//! applies requests one at a time (`tools/moto_endpoint.py`), started on a loopback port and tied
//! to this process's life, plus SDK clients pointed at it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use adpipe_aws::Clients;
use aws_credential_types::Credentials;

use crate::resources::{LOCAL_ACCESS_KEY_ID, LOCAL_SECRET_ACCESS_KEY};
use crate::LocalError;

/// The workspace root (this crate lives at `tools/local`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// How to start the local endpoint: a program and its leading arguments (`-H`/`-p` follow).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// Makes sure the project venv exists (`scripts/venv.sh` is idempotent and fast once done) and
/// returns the command that starts the endpoint: moto's server behind our launcher
/// (`tools/moto_endpoint.py`), which applies requests one at a time so that writes to one
/// DynamoDB item are atomic, as in DynamoDB (plain `moto_server` applies concurrent writes to one
/// item without isolation; see `docs/LOCAL.md`).
pub fn endpoint_server(root: &Path) -> Result<ServerCommand, LocalError> {
    let status = Command::new("bash")
        .arg(root.join("scripts/venv.sh"))
        .status()
        .map_err(|e| LocalError::Tool {
            tool: "scripts/venv.sh".into(),
            detail: e.to_string(),
        })?;
    if !status.success() {
        return Err(LocalError::Tool {
            tool: "scripts/venv.sh".into(),
            detail: status.to_string(),
        });
    }
    Ok(ServerCommand {
        program: root.join(".venv/bin/python"),
        args: vec![root.join("tools/moto_endpoint.py").display().to_string()],
    })
}

/// A free loopback port (the OS picks it; a race with another process is retried by callers).
pub fn free_port() -> Result<u16, LocalError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(LocalError::io("binding a port"))?;
    let port = listener
        .local_addr()
        .map_err(LocalError::io("reading the bound port"))?
        .port();
    Ok(port)
}

/// Whether something already listens on the loopback port.
pub fn port_in_use(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A running endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub port: u16,
    /// Where the server writes its log.
    pub log: PathBuf,
}

impl LocalEndpoint {
    /// Starts the endpoint server on `port` (or a free one, retried a few times if it was taken
    /// meanwhile) and waits until it answers. The server gets SIGTERM when this process ends.
    pub fn start(
        server: &ServerCommand,
        port: Option<u16>,
        log_dir: &Path,
    ) -> Result<Self, LocalError> {
        std::fs::create_dir_all(log_dir).map_err(LocalError::io("creating the log directory"))?;
        let tries = if port.is_some() { 1 } else { 3 };
        let mut last = LocalError::Endpoint("not started".into());
        for _ in 0..tries {
            let port = match port {
                Some(p) => p,
                None => free_port()?,
            };
            if port_in_use(port) {
                last = LocalError::Endpoint(format!("port {port} is already in use"));
                continue;
            }
            let log = log_dir.join(format!("moto-{port}.log"));
            spawn_tied_to_process(server, port, &log)?;
            match wait_ready(port, Duration::from_secs(60)) {
                Ok(()) => {
                    return Ok(LocalEndpoint {
                        url: format!("http://127.0.0.1:{port}"),
                        port,
                        log,
                    })
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// An endpoint someone else started (for example `adpipe up`).
    pub fn existing(url: &str) -> Self {
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .unwrap_or(0);
        LocalEndpoint {
            url: url.trim_end_matches('/').to_owned(),
            port,
            log: PathBuf::new(),
        }
    }

    /// Whether the endpoint answers.
    pub fn is_up(&self) -> bool {
        probe(self.port)
    }

    /// SDK configuration for the endpoint: fixed region and the dummy credentials.
    pub async fn sdk_config(&self, region: &str) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_owned()))
            .credentials_provider(Credentials::new(
                LOCAL_ACCESS_KEY_ID,
                LOCAL_SECRET_ACCESS_KEY,
                None,
                None,
                "adpipe-local",
            ))
            .endpoint_url(&self.url)
            .load()
            .await
    }

    /// The functions' clients, pointed at the endpoint.
    pub async fn clients(&self, region: &str) -> Clients {
        Clients::new(&self.sdk_config(region).await)
    }
}

/// Spawns the server from a thread that never exits. The child gets SIGTERM when the thread
/// that forked it dies (PR_SET_PDEATHSIG), so the server lives exactly as long as this process,
/// whether it ends normally, by Ctrl-C or by a panic.
fn spawn_tied_to_process(server: &ServerCommand, port: u16, log: &Path) -> Result<(), LocalError> {
    let (tx, rx) = mpsc::channel();
    let shown = server.program.display().to_string();
    let server = server.clone();
    let log = log.to_path_buf();
    std::thread::Builder::new()
        .name(format!("moto-server-{port}"))
        .spawn(move || {
            let spawned = (|| -> std::io::Result<std::process::Child> {
                let log = std::fs::File::create(&log)?;
                let mut cmd = Command::new(&server.program);
                cmd.args(&server.args)
                    .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log);
                // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
                unsafe {
                    use std::os::unix::process::CommandExt;
                    cmd.pre_exec(|| {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                cmd.spawn()
            })();
            match spawned {
                Ok(child) => {
                    let _ = tx.send(Ok(()));
                    let _keep = child;
                    loop {
                        std::thread::park();
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })
        .map_err(LocalError::io("starting the server thread"))?;
    rx.recv()
        .map_err(|e| LocalError::Endpoint(format!("server thread ended: {e}")))?
        .map_err(|e| LocalError::Endpoint(format!("spawning {shown}: {e}")))
}

fn probe(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    if s.set_read_timeout(Some(Duration::from_secs(5))).is_err() {
        return false;
    }
    if s.write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.")
}

fn wait_ready(port: u16, timeout: Duration) -> Result<(), LocalError> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if probe(port) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(LocalError::Endpoint(format!(
        "local endpoint on port {port} not ready within {timeout:?}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn existing_endpoints_parse_their_port() {
        let e = LocalEndpoint::existing("http://127.0.0.1:4566/");
        assert_eq!(e.port, 4566);
        assert_eq!(e.url, "http://127.0.0.1:4566");
    }

    #[test]
    fn the_workspace_root_holds_the_scripts() {
        assert!(workspace_root().join("scripts/venv.sh").is_file());
    }
}
