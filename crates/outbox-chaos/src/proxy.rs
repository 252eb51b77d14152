//! A TCP proxy of our own between outboxd and PostgreSQL or NATS, for
//! partitions: pass, blackhole (bytes are held, as a network partition holds
//! TCP segments until it heals or the peer gives up), latency, and reset
//! (every open connection is cut).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// What the proxy does with the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward at once.
    Pass,
    /// Hold everything (and new connections) until the mode changes.
    Blackhole,
    /// Forward each chunk after this delay.
    Latency(Duration),
}

/// A running proxy; dropping it stops accepting and cuts every connection.
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    /// Listens on a free 127.0.0.1 port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Pass);
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = tokio::spawn({
            let mode = mode.subscribe();
            let tasks = tasks.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let mode = mode.clone();
                    let handle = tokio::spawn(async move {
                        let _ = carry(client, upstream, mode).await;
                    });
                    if let Ok(mut tasks) = tasks.lock() {
                        tasks.retain(|t| !t.is_finished());
                        tasks.push(handle.abort_handle());
                    }
                }
            }
        })
        .abort_handle();
        Ok(Self {
            addr,
            mode,
            tasks,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches the mode for every connection, open or new.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Cuts every open connection; new ones are accepted as the mode says.
    pub fn reset(&self) {
        if let Ok(mut tasks) = self.tasks.lock() {
            for task in tasks.drain(..) {
                task.abort();
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset();
    }
}

async fn carry(
    client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
) -> std::io::Result<()> {
    // A partition also swallows the connection attempt.
    pass_allowed(&mut mode).await;
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        r = pump(client_read, server_write, mode.clone()) => r,
        r = pump(server_read, client_write, mode) => r,
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        if let Mode::Latency(delay) = pass_allowed(&mut mode).await {
            tokio::time::sleep(delay).await;
        }
        to.write_all(&buf[..n]).await?;
    }
}

/// Waits while the proxy is blackholed; returns the mode that let bytes pass.
async fn pass_allowed(mode: &mut watch::Receiver<Mode>) -> Mode {
    loop {
        let current = *mode.borrow_and_update();
        if current != Mode::Blackhole {
            return current;
        }
        if mode.changed().await.is_err() {
            return Mode::Pass;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ok(addr)
    }

    async fn round_trip(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
        stream.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await?;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn blackhole_holds_bytes_until_healed_and_reset_cuts() -> std::io::Result<()> {
        let proxy = Proxy::start(echo_server().await?).await?;
        let mut stream = TcpStream::connect(proxy.addr()).await?;
        assert_eq!(round_trip(&mut stream).await?, b"ping");

        proxy.set(Mode::Blackhole);
        let held = tokio::time::timeout(Duration::from_millis(200), round_trip(&mut stream)).await;
        assert!(held.is_err(), "a blackholed proxy must not answer");
        proxy.set(Mode::Pass);
        // The held "ping" arrives once the partition heals.
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ping");

        proxy.reset();
        let mut rest = Vec::new();
        let cut = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut rest)).await;
        assert!(
            matches!(cut, Ok(Ok(_)) | Ok(Err(_))),
            "reset must end the stream"
        );
        Ok(())
    }

    #[tokio::test]
    async fn latency_delays_each_chunk() -> std::io::Result<()> {
        let proxy = Proxy::start(echo_server().await?).await?;
        proxy.set(Mode::Latency(Duration::from_millis(100)));
        let mut stream = TcpStream::connect(proxy.addr()).await?;
        let started = std::time::Instant::now();
        round_trip(&mut stream).await?;
        assert!(started.elapsed() >= Duration::from_millis(200));
        Ok(())
    }
}
