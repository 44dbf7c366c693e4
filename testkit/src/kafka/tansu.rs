//! A private tansu broker (`Tansu`) on its own port, for tests that kill and restart
//! their broker without disturbing the shared one on 9092.

use std::time::{Duration, Instant};

/// A private tansu broker (same command line as `scripts/kafka-broker.sh`, in-memory
/// storage) on its own port, so stopping it disturbs no other test. Killed on drop.
pub struct Tansu {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl Tansu {
    pub fn start(port: u16) -> Tansu {
        let mut t = Tansu { port, child: None };
        t.spawn();
        t
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::File::create(format!("/tmp/tansu-fault-{}.log", self.port)).unwrap();
        let child = std::process::Command::new("tansu")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("tansu on PATH (scripts/kafka-broker.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL the broker (its in-memory log is gone with it).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}
