//! Self-signed certificates for the HTTPS scenarios, written into a
//! Switchyard certificate store as `NAME.crt` and `NAME.key`.

use std::fs;
use std::io::Write;
use std::path::Path;

use rustls::pki_types::CertificateDer;

/// A generated certificate: PEM texts and the DER leaf for pinning.
pub struct GeneratedCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

/// Generates an ECDSA P-256 self-signed certificate for `localhost` and
/// `127.0.0.1`.
pub fn generate() -> Result<GeneratedCert, String> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| format!("cannot generate a self-signed certificate: {e}"))?;
    Ok(GeneratedCert {
        cert_pem: generated.cert.pem(),
        key_pem: generated.signing_key.serialize_pem(),
        der: generated.cert.der().clone(),
    })
}

/// Replaces `path` with `bytes` by writing a hidden temporary file in the
/// same folder and renaming it, so a reader sees the old or the new file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&temp);
        format!("cannot write {}: {e}", path.display())
    })
}

/// Installs `cert` in `store` as `name`: the key first, then the chain.
/// Between the two renames the store sees a new key with the old chain,
/// which it must reject as a mismatched pair and keep serving the old one.
pub fn install(store: &Path, name: &str, cert: &GeneratedCert) -> Result<(), String> {
    write_atomically(&store.join(format!("{name}.key")), cert.key_pem.as_bytes())?;
    write_atomically(&store.join(format!("{name}.crt")), cert.cert_pem.as_bytes())
}
