//! A private `redis-server` per test, on a free port, killed on drop; never the shared one.

use super::{free_port, signal};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` process owned by one test.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
}

fn redis_server_binary() -> String {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join("redis-server")).find(|p| p.is_file()));
    match found {
        Some(path) => path.display().to_string(),
        None => panic!(
            "redis-server is not installed, and these tests need a real one. Install it with \
             `apt-get install -y redis-server` (or run `tests/run.sh`, which installs it)."
        ),
    }
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> Self {
        let mut server = Self { child: None, port: free_port() };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new(redis_server_binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers_ping() {
            assert!(Instant::now() < deadline, "redis-server on port {} did not answer PING", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers_ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut reply = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server is running").id()
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        signal(self.pid(), "CONT");
    }

    /// `PUBSUB NUMSUB channel`: how many connections subscribe to `channel`.
    pub async fn numsub(&self, channel: &str) -> i64 {
        let client = redis::Client::open(self.url()).expect("valid url");
        let mut conn = client.get_multiplexed_async_connection().await.expect("redis connection");
        let (_, n): (String, i64) =
            redis::cmd("PUBSUB").arg("NUMSUB").arg(channel).query_async(&mut conn).await.expect("PUBSUB NUMSUB");
        n
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A paused server ignores SIGKILL until resumed on some kernels; resume first.
            signal(child.id(), "CONT");
        }
        self.kill();
    }
}
