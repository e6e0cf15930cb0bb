//! The HTTP listeners switchyard serves (metrics, the schema registry).

use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::error::{Error, Result};

/// Binds `addr` (port 0 picks a free one); returns the listener and the address it is bound to.
pub async fn listen(addr: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    let bind = |source| Error::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind)?;
    let bound = listener.local_addr().map_err(bind)?;
    Ok((listener, bound))
}
