//! The accept loop: the axum router on hyper, with what `axum::serve` does not let us set:
//! a header read timeout (a client that sends half a request head is cut off instead of
//! holding a connection forever), a bound on open connections (one more gets a 503 naming the
//! limit), TCP_NODELAY, keep-alive and pipelining, and a graceful drain.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, StatusCode};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// What one client connection may take.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// How long a request head may take to arrive (then the connection is closed).
    pub header_read_timeout: Duration,
    /// Open connections at most; beyond them a connection gets one 503 and is closed.
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `shutdown` resolves, then waits for the open connections
/// to finish what they are doing.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let over_limit = too_many_connections(limits.max_connections);
    let graceful = GracefulShutdown::new();
    let mut accept_errors = AcceptErrors::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, _) = match accepted {
                    Ok(conn) => conn,
                    // The peer gave up before we took the connection: nothing to wait for.
                    Err(e) if is_connection_error(&e) => continue,
                    Err(e) => {
                        // Out of file descriptors and the like: retrying at once would spin a
                        // core and flood the log while nothing changes. Wait for connections
                        // to close (the open ones keep being served meanwhile).
                        accept_errors.record(&e);
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                // Without TCP_NODELAY a token written right after another waits for the
                // client's delayed ACK (40 ms on Linux): streamed tokens would come in bursts.
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!("TCP_NODELAY on an accepted connection: {e}");
                }
                // A connection holds its permit until it ends; without one it is answered by
                // `over_limit` (a 503, then closed), not left waiting in the backlog.
                let permit = open.clone().try_acquire_owned().ok();
                let app = if permit.is_some() { app.clone() } else { over_limit.clone() };
                let service = TowerToHyperService::new(app);
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("connection ended: {e}");
                    }
                    drop(permit);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// What a connection past `--max-connections` gets for any request: a 503 in OpenAI's error
/// shape that names the limit, and the connection closed.
fn too_many_connections(max: usize) -> Router {
    Router::new().fallback(move || async move {
        let message = format!(
            "the server has {max} connections open, its limit (--max-connections); retry shortly"
        );
        let body = serde_json::json!({
            "error": {"message": message, "type": "server_error", "param": null, "code": "too_many_connections"}
        });
        let headers = [(header::CONNECTION, "close"), (header::RETRY_AFTER, "1")];
        (StatusCode::SERVICE_UNAVAILABLE, headers, axum::Json(body))
    })
}

/// How long the accept loop waits after an error that is not the peer's (EMFILE, ENFILE,
/// ENOBUFS): hyper's and axum's loops wait too.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// At most one warning this often about failing accepts; the rest are counted into it.
const ACCEPT_WARNING_EVERY: Duration = Duration::from_secs(10);

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}

/// Rate-limits the accept loop's warning.
#[derive(Default)]
struct AcceptErrors {
    last_warning: Option<Instant>,
    since_warning: u64,
}

impl AcceptErrors {
    fn record(&mut self, e: &std::io::Error) {
        self.since_warning += 1;
        let now = Instant::now();
        if self.last_warning.is_some_and(|t| now.duration_since(t) < ACCEPT_WARNING_EVERY) {
            return;
        }
        tracing::warn!(
            failures = self.since_warning,
            "accepting connections fails ({e}); retrying every {} ms, open connections are still served",
            ACCEPT_BACKOFF.as_millis()
        );
        self.last_warning = Some(now);
        self.since_warning = 0;
    }
}
