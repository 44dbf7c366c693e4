//! A private tansu broker (`Tansu`) on its own port, for tests that kill and restart
//! their broker without disturbing the shared one on 9092.

use std::time::{Duration, Instant};

/// A private tansu broker (same command line as `scripts/kafka-broker.sh`, in-memory
/// storage) on its own port, so stopping it disturbs no other test. Killed on drop.
pub struct Tansu {
    pub port: u16,
    child: Option<std::process::Child>,
}

/// Ports tried for a private broker: below Linux's ephemeral range (32768–60999), so
/// the kernel never hands one out to an outgoing connection meanwhile.
const PORTS: std::ops::Range<u16> = 20_000..30_000;

impl Tansu {
    /// Start a broker on a port nothing listens on. No port is bound and released
    /// beforehand (that races with parallel tests): a random port is tried, and if tansu
    /// cannot take it (it exits), another.
    pub fn start() -> Tansu {
        for _ in 0..20 {
            let port = rand::Rng::gen_range(&mut rand::thread_rng(), PORTS);
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                continue; // somebody listens there
            }
            let mut t = Tansu { port, child: None };
            if t.spawn() {
                return t;
            }
        }
        panic!("tansu could not listen on any of 20 random ports in {PORTS:?}");
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Start tansu on `self.port`; `false` if it exited (the port was taken).
    fn spawn(&mut self) -> bool {
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
        loop {
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().unwrap().is_some() {
                    self.child = None;
                    return false;
                }
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
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

    /// Kill and start again on the same port (the relay under test is configured with it).
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "tansu could not listen again on {}",
            self.port
        );
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}
