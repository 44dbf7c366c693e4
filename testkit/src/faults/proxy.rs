//! A TCP proxy (`Proxy`) between the relay and a broker that can freeze or drop the
//! traffic on demand.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const PASS: u8 = 0;
const FREEZE: u8 = 1;

/// A TCP proxy on 127.0.0.1 in front of `upstream`. `freeze` stops forwarding in both
/// directions while keeping every socket open (new connections are accepted and frozen
/// too); `thaw` resumes; `drop_all` closes every open connection (new ones are served).
pub struct Proxy {
    pub port: u16,
    mode: Arc<AtomicU8>,
    /// Bumped by `drop_all`; connections opened under an older generation close.
    generation: watch::Sender<u64>,
    thawed: watch::Sender<u8>,
    pub connections: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(PASS));
        let (generation, _) = watch::channel(0u64);
        let (thawed, _) = watch::channel(PASS);
        let connections = Arc::new(AtomicU64::new(0));
        let upstream = upstream.to_string();
        let accept = {
            let (gen_rx, thaw_rx) = (generation.subscribe(), thawed.subscribe());
            let connections = connections.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let upstream = upstream.clone();
                    let mut gen_rx = gen_rx.clone();
                    let thaw_rx = thaw_rx.clone();
                    tokio::spawn(async move {
                        let born = *gen_rx.borrow_and_update();
                        let Ok(server) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        let pipe = async {
                            tokio::join!(
                                pump(cr, sw, thaw_rx.clone()),
                                pump(sr, cw, thaw_rx.clone())
                            )
                        };
                        tokio::select! {
                            _ = pipe => {}
                            _ = async { while *gen_rx.borrow() == born { if gen_rx.changed().await.is_err() { break; } } } => {}
                        }
                        // Dropping the halves closes both sockets.
                    });
                }
            })
        };
        Proxy {
            port,
            mode,
            generation,
            thawed,
            connections,
            accept,
        }
    }

    pub fn freeze(&self) {
        self.mode.store(FREEZE, Ordering::SeqCst);
        self.thawed.send_replace(FREEZE);
    }

    pub fn thaw(&self) {
        self.mode.store(PASS, Ordering::SeqCst);
        self.thawed.send_replace(PASS);
    }

    /// Close every open connection at once (a network cut or a firewall reset).
    pub fn drop_all(&self) {
        self.generation.send_modify(|g| *g += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.drop_all();
    }
}

/// Copy `from` → `to`, holding every chunk while the proxy is frozen.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut thawed: watch::Receiver<u8>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Frozen: read nothing (the sender's buffers fill up, as on a stalled path).
        while *thawed.borrow_and_update() == FREEZE {
            if thawed.changed().await.is_err() {
                return;
            }
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        while *thawed.borrow_and_update() == FREEZE {
            if thawed.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
