//! `ctl certs` and `ctl renew` over the certificate store.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{json, Value};

use super::CertControl;
use crate::acme::{acme_certificate_name, AcmeManager};
use crate::tls::CertStore;

/// Lists the store's certificates and, with ACME on, each managed host's
/// renewal plan; renews through the ACME manager.
pub struct StoreCertControl {
    pub store: Arc<CertStore>,
    pub acme: Option<Arc<AcmeManager>>,
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
                    "managed_by": if cert.name.starts_with(&acme_certificate_name("")) { "acme" } else { "file" },
                })
            })
            .collect();
        let Some(acme) = &self.acme else {
            return Ok(Value::Array(certificates));
        };
        // With ACME on, each managed host is listed with its renewal plan,
        // including hosts that have no certificate yet.
        let mut list = certificates;
        for host in acme.status() {
            list.push(json!({
                "name": format!("acme host {}", host.host),
                "dns_names": [host.host],
                "serial": host.serial,
                "not_after": host.not_after,
                "expires_in_days": host.not_after.map(|t| (t - now) / 86_400),
                "managed_by": "acme",
                "next_renewal": host.next_renewal,
                "renewal_basis": host.renewal_basis,
                "failures": host.failures,
            }));
        }
        Ok(Value::Array(list))
    }

    async fn renew(&self, domain: &str) -> Result<Value, String> {
        if let Some(acme) = &self.acme {
            let status = acme.renew_now(domain).await.map_err(|e| e.to_string())?;
            return serde_json::to_value(status).map_err(|e| e.to_string());
        }
        Err(format!(
            "cannot renew {domain:?}: ACME is not configured; replace its .crt and .key files in {} and run `switchyard ctl reload`",
            self.store.dir().display()
        ))
    }
}
