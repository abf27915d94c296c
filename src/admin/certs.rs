//! `ctl certs` and `ctl renew` over the certificate store.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{json, Value};

use super::CertControl;
use crate::tls::CertStore;

/// Lists the store's certificates; renewals need an ACME manager, which
/// replaces this control when ACME is configured.
pub struct StoreCertControl {
    pub store: Arc<CertStore>,
}

#[async_trait]
impl CertControl for StoreCertControl {
    fn list(&self) -> Result<Value, String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let certificates: Vec<Value> = self
            .store
            .certificates()
            .into_iter()
            .map(|cert| {
                json!({
                    "name": cert.name,
                    "dns_names": cert.dns_names,
                    "serial": cert.serial,
                    "not_before": cert.not_before,
                    "not_after": cert.not_after,
                    "expires_in_days": (cert.not_after - now) / 86_400,
                    "managed_by": "file",
                })
            })
            .collect();
        Ok(Value::Array(certificates))
    }

    async fn renew(&self, domain: &str) -> Result<Value, String> {
        Err(format!(
            "cannot renew {domain:?}: ACME is not configured; replace its .crt and .key files in {} and run `switchyard ctl reload`",
            self.store.dir().display()
        ))
    }
}
