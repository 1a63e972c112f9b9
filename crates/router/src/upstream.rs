//! Upstream connections to the engines, driven by the task that relays the
//! answer.
//!
//! With a pooled client, each upstream connection runs in a task of its
//! own: every event of a stream is decoded there, handed across a channel to
//! the task writing to the client, and written alone (one `writev` per
//! event, two task wake-ups per event; a whole answer pays the hand-offs
//! too). Here the relaying task owns the connection (hyper's
//! `client::conn::http1`) and polls it itself, so every event that has
//! arrived is decoded and taken in one go and leaves in one write, without
//! waiting for anything that has not arrived. Idle
//! connections are kept per instance address and reused (HTTP/1.1
//! keep-alive); a connection whose stream did not end cleanly (client gone,
//! error) is dropped, which closes it, which cancels the request upstream.
//!
//! Engines of cloud instances are reached over mutual TLS ([`crate::tls`]):
//! the same connection over a `tokio_rustls` stream ([`Io::Tls`]); their
//! idle connections are kept under a key of their own (`tls://host`), so a
//! plain and a TLS connection are never mixed up.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::UpstreamTls;

/// The byte stream under a connection: plain TCP (engines on this host) or
/// TLS over TCP (engines of cloud instances).
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Idle connections kept per instance address.
const MAX_IDLE_PER_HOST: usize = 1024;

/// One upstream HTTP/1.1 connection: its request half and the connection
/// itself, which whoever holds it must poll.
pub(crate) struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    conn: http1::Connection<TokioIo<Io>, Full<Bytes>>,
}

impl Conn {
    /// Let the connection read, decode and write what it can. `false` once
    /// it has ended (closed by either side, or failed).
    pub(crate) fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        Pin::new(&mut self.conn).poll(cx).is_pending()
    }

    /// Whether an idle connection is still usable (the instance may have
    /// closed it meanwhile).
    fn alive(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.drive(&mut cx) && !self.sender.is_closed()
    }
}

/// Why no answer came back on a connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("the connection closed before an answer")]
    Closed,
}

impl SendError {
    pub(crate) fn is_connect(&self) -> bool {
        matches!(
            self,
            SendError::Connect(_) | SendError::ConnectTimeout | SendError::Tls(_)
        )
    }
}

/// Idle upstream connections, by `host:port`.
#[derive(Default)]
pub(crate) struct UpstreamConns {
    idle: Mutex<HashMap<String, Vec<Conn>>>,
}

impl UpstreamConns {
    fn idle(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Conn>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used live idle connection to `host`.
    fn take(&self, host: &str) -> Option<Conn> {
        let mut idle = self.idle();
        let list = idle.get_mut(host)?;
        while let Some(mut c) = list.pop() {
            if c.alive() {
                return Some(c);
            }
        }
        None
    }

    /// Keep `conn` for the next stream to `host`.
    pub(crate) fn put(&self, host: &str, mut conn: Conn) {
        if !conn.alive() {
            return;
        }
        let mut idle = self.idle();
        let list = idle.entry(host.to_string()).or_default();
        if list.len() < MAX_IDLE_PER_HOST {
            list.push(conn);
        }
    }

    /// Forget the idle connections of hosts not in `keep` (instances gone).
    pub(crate) fn retain_hosts(&self, keep: &dyn Fn(&str) -> bool) {
        self.idle().retain(|host, _| keep(host));
    }

    /// Send `make()`'s request to `host` (over `tls` when given) on an idle
    /// connection kept under `key` or a new one, driving the connection
    /// until the answer's head arrives. A reused connection that fails
    /// before answering is replaced by a new one once (it may have been
    /// closed while idle). `key` is `host` for plain connections and
    /// something else for TLS ones (see [`crate::pool::Backend::conn_key`]).
    pub(crate) async fn send(
        &self,
        key: &str,
        host: &str,
        tls: Option<&UpstreamTls>,
        connect_timeout: Duration,
        make: impl Fn() -> hyper::Request<Full<Bytes>>,
    ) -> Result<(hyper::Response<Incoming>, Conn), SendError> {
        if let Some(mut conn) = self.take(key) {
            if let Ok(resp) = send_on(&mut conn, make()).await {
                return Ok((resp, conn));
            }
        }
        let mut conn = connect(host, tls, connect_timeout).await?;
        let resp = send_on(&mut conn, make()).await?;
        Ok((resp, conn))
    }
}

async fn connect(
    host: &str,
    tls: Option<&UpstreamTls>,
    timeout: Duration,
) -> Result<Conn, SendError> {
    let open = async {
        let tcp = TcpStream::connect(host).await.map_err(SendError::Connect)?;
        tcp.set_nodelay(true).map_err(SendError::Connect)?;
        match tls {
            None => Ok::<_, SendError>(Io::Plain(tcp)),
            Some(t) => {
                let connector = tokio_rustls::TlsConnector::from(t.config.clone());
                let s = connector
                    .connect(t.server_name.clone(), tcp)
                    .await
                    .map_err(SendError::Tls)?;
                Ok(Io::Tls(Box::new(s)))
            }
        }
    };
    let io = tokio::time::timeout(timeout, open)
        .await
        .map_err(|_| SendError::ConnectTimeout)??;
    let (sender, conn) = http1::handshake(TokioIo::new(io)).await?;
    Ok(Conn { sender, conn })
}

/// Send `req` on `conn`, polling the connection until the answer's head
/// arrives (or the connection ends).
async fn send_on(
    conn: &mut Conn,
    req: hyper::Request<Full<Bytes>>,
) -> Result<hyper::Response<Incoming>, SendError> {
    let Conn { sender, conn } = conn;
    let mut open = true;
    // Ready once the connection (which must be polled for it) is idle.
    std::future::poll_fn(|cx| driven(conn, &mut open, cx, |cx| sender.poll_ready(cx))).await?;
    let mut answer = std::pin::pin!(sender.send_request(req));
    std::future::poll_fn(|cx| driven(conn, &mut open, cx, |cx| answer.as_mut().poll(cx))).await
}

/// Drive `conn` (while `open`), then poll `inner`; once the connection has
/// ended, what `inner` still waits for will never come: `Closed`.
fn driven<T>(
    conn: &mut http1::Connection<TokioIo<Io>, Full<Bytes>>,
    open: &mut bool,
    cx: &mut Context<'_>,
    inner: impl FnOnce(&mut Context<'_>) -> Poll<Result<T, hyper::Error>>,
) -> Poll<Result<T, SendError>> {
    if *open {
        *open = Pin::new(&mut *conn).poll(cx).is_pending();
    }
    match inner(cx) {
        Poll::Ready(r) => Poll::Ready(r.map_err(SendError::Http)),
        Poll::Pending if *open => Poll::Pending,
        Poll::Pending => Poll::Ready(Err(SendError::Closed)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Sets its flag when the server drops the stream it belongs to.
    struct Dropped(Arc<AtomicBool>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// A server whose `/three` streams three chunks and whose `/forever`
    /// streams one and then nothing; counts accepted connections.
    async fn server() -> (String, Arc<AtomicUsize>, Arc<AtomicBool>) {
        use axum::serve::ListenerExt;
        let accepted = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicBool::new(false));
        let d = dropped.clone();
        let app = axum::Router::new()
            .route(
                "/three",
                axum::routing::post(|| async {
                    let chunks = ["a\n\n", "b\n\n", "c\n\n"]
                        .map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c.as_bytes())));
                    axum::body::Body::from_stream(futures::stream::iter(chunks))
                }),
            )
            .route(
                "/forever",
                axum::routing::post(move || {
                    let guard = Dropped(d.clone());
                    async move {
                        let first = futures::stream::once(async {
                            Ok::<_, std::io::Error>(Bytes::from_static(b"a\n\n"))
                        });
                        let rest = futures::stream::pending().map(move |x: Bytes| {
                            let _keep = &guard;
                            Ok(x)
                        });
                        axum::body::Body::from_stream(first.chain(rest))
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let count = accepted.clone();
        let listener = listener.tap_io(move |_| {
            count.fetch_add(1, Ordering::SeqCst);
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        (host, accepted, dropped)
    }

    fn request(host: &str, path: &'static str) -> hyper::Request<Full<Bytes>> {
        let mut r = hyper::Request::new(Full::new(Bytes::from_static(b"{}")));
        *r.method_mut() = hyper::Method::POST;
        *r.uri_mut() = hyper::Uri::from_static(path);
        r.headers_mut()
            .insert(hyper::header::HOST, host.parse().unwrap());
        r
    }

    /// Read the whole body, driving the connection as the relay does.
    async fn read_driven(resp: hyper::Response<Incoming>, conn: &mut Conn) -> Vec<u8> {
        let mut body = resp.into_body();
        let mut out = Vec::new();
        loop {
            let frame = std::future::poll_fn(|cx| {
                conn.drive(cx);
                Pin::new(&mut body).poll_frame(cx)
            })
            .await;
            match frame {
                Some(f) => out.extend_from_slice(&f.unwrap().into_data().unwrap()),
                None => return out,
            }
        }
    }

    use futures::StreamExt;
    use hyper::body::Body as _;

    #[tokio::test]
    async fn streams_reuse_one_connection_and_a_dropped_one_closes() {
        let (host, accepted, dropped) = server().await;
        let conns = UpstreamConns::default();
        let timeout = Duration::from_secs(5);
        for _ in 0..3 {
            let (resp, mut conn) = conns
                .send(&host, &host, None, timeout, || request(&host, "/three"))
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(read_driven(resp, &mut conn).await, b"a\n\nb\n\nc\n\n");
            conns.put(&host, conn);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "keep-alive reuse");

        // A stream abandoned midway: its connection is dropped, not kept,
        // and the server sees the request go away.
        let (resp, mut conn) = conns
            .send(&host, &host, None, timeout, || request(&host, "/forever"))
            .await
            .unwrap();
        let mut body = resp.into_body();
        let first = std::future::poll_fn(|cx| {
            conn.drive(cx);
            Pin::new(&mut body).poll_frame(cx)
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"a\n\n"));
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the idle one was reused"
        );
        drop(body);
        drop(conn);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !dropped.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "server never saw the close"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Nothing idle left: the next stream opens a new connection.
        let (resp, mut conn) = conns
            .send(&host, &host, None, timeout, || request(&host, "/three"))
            .await
            .unwrap();
        assert_eq!(read_driven(resp, &mut conn).await, b"a\n\nb\n\nc\n\n");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        // Forgetting a host closes its idle connections.
        conns.put(&host, conn);
        conns.retain_hosts(&|_| false);
        assert!(conns.take(&host).is_none());
    }

    /// A TLS server for `gpufleet-engine` that requires a client certificate
    /// signed by `client_ca_pem` and answers every request `ok`; its
    /// certificate PEM and address.
    async fn tls_server(client_ca_pem: &str) -> (String, String) {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let engine =
            rcgen::generate_simple_self_signed(vec![crate::tls::ENGINE_TLS_SERVER_NAME.into()])
                .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(client_ca_pem.as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![engine.cert.der().clone()],
                PrivateKeyDer::from_pem_slice(engine.signing_key.serialize_pem().as_bytes())
                    .unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        // Head and the 2-byte body `{}`.
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            if buf.len() >= end + 4 + 2 {
                                buf.drain(..end + 6);
                                let _ = s
                                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                    .await;
                                continue;
                            }
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (engine.cert.pem(), host)
    }

    #[tokio::test]
    async fn tls_engines_need_the_router_identity_and_keep_their_own_idle_connections() {
        let router = rcgen::generate_simple_self_signed(vec!["gpufleet-router".into()]).unwrap();
        let identity = crate::tls::EngineClientIdentity {
            cert_pem: router.cert.pem(),
            key_pem: router.signing_key.serialize_pem(),
        };
        let (engine_pem, host) = tls_server(&identity.cert_pem).await;
        let conns = UpstreamConns::default();
        let timeout = Duration::from_secs(5);
        let key = format!("tls://{host}");

        // With the router's identity: answered, and kept under the TLS key.
        let tls = crate::tls::client_config(&engine_pem, &identity).unwrap();
        for _ in 0..2 {
            let (resp, mut conn) = conns
                .send(&key, &host, Some(&tls), timeout, || request(&host, "/x"))
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(read_driven(resp, &mut conn).await, b"ok");
            conns.put(&key, conn);
        }
        assert!(conns.take(&host).is_none(), "plain and TLS never mix");
        assert!(conns.take(&key).is_some());

        // Another identity, or none: refused.
        let stranger = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        let other = crate::tls::EngineClientIdentity {
            cert_pem: stranger.cert.pem(),
            key_pem: stranger.signing_key.serialize_pem(),
        };
        let wrong = crate::tls::client_config(&engine_pem, &other).unwrap();
        let none = {
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(
                    rustls::pki_types::CertificateDer::from_pem_slice(engine_pem.as_bytes())
                        .unwrap(),
                )
                .unwrap();
            let c = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            UpstreamTls {
                config: Arc::new(c),
                server_name: tls.server_name.clone(),
            }
        };
        for bad in [&wrong, &none] {
            let r = conns
                .send("k2", &host, Some(bad), timeout, || request(&host, "/x"))
                .await;
            assert!(
                r.is_err(),
                "a client without the router's identity is refused"
            );
        }

        // A plain client to a TLS engine gets no answer either.
        let r = conns
            .send(&host, &host, None, timeout, || request(&host, "/x"))
            .await;
        assert!(r.is_err());

        // Trusting another certificate than the engine's: refused by the client.
        let (other_engine_pem, _) = tls_server(&identity.cert_pem).await;
        let mistrust = crate::tls::client_config(&other_engine_pem, &identity).unwrap();
        let r = conns
            .send("k3", &host, Some(&mistrust), timeout, || {
                request(&host, "/x")
            })
            .await;
        assert!(matches!(r, Err(SendError::Tls(_))), "{:?}", r.err());
    }
}
