//! TLS with certificates the test makes: the HTTP API over HTTPS, and the
//! whole pipeline against a Redis that needs TLS and an ACL user.

mod common;

use common::*;
use mongodb::bson::doc;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use std::{path::Path, time::Duration};

/// Paths of a CA certificate and of a server certificate it signed for
/// `localhost` and `127.0.0.1`, with the server's key.
struct Certs {
    ca: String,
    cert: String,
    key: String,
}

fn make_certs(dir: &Path) -> Certs {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path.display().to_string()
    };
    Certs {
        ca: write("ca.pem", ca.pem()),
        cert: write("server.pem", cert.pem()),
        key: write("server.key", key.serialize_pem()),
    }
}

#[actix_web::test]
async fn the_api_serves_https_with_a_generated_certificate() {
    let ns = Namespace::new("https");
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let port = free_port();
    let config = config_with(
        &ns,
        &format!(
            "[http]\nenabled = true\nbind = \"127.0.0.1:{port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            certs.cert, certs.key
        ),
    );
    let engine = start_with(config).await;
    let server = datasync::http::serve(engine.clone()).unwrap();
    let handle = server.handle();
    actix_web::rt::spawn(server);

    let tls = datasync::tls::client_config(&certs.ca).unwrap();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap();
    let url = format!("https://127.0.0.1:{port}/health/live");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let answered = loop {
        match client.get(&url).send().await {
            Ok(r) => break r.status().as_u16(),
            Err(e) if std::time::Instant::now() > deadline => panic!("no HTTPS answer: {e}"),
            Err(_) => tokio::task::yield_now().await,
        }
    };
    assert_eq!(answered, 200);
    // Plain HTTP on the same port gets no answer, and a client that does not
    // trust the CA is refused.
    let plain = http_client()
        .get(format!("http://127.0.0.1:{port}/health/live"))
        .send()
        .await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true));
    let untrusting = reqwest::Client::builder()
        .use_preconfigured_tls(datasync::tls::client_config("").unwrap())
        .build()
        .unwrap();
    assert!(untrusting.get(&url).send().await.is_err());
    handle.stop(true).await;
    finish(engine, &ns).await;
}

/// A Redis that only speaks TLS and only lets the ACL user `datasync` in.
struct SecureRedis {
    child: std::process::Child,
    port: u16,
}

impl Drop for SecureRedis {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn start_secure_redis(dir: &Path, certs: &Certs) -> SecureRedis {
    let port = free_port();
    let child = std::process::Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .args(["--tls-cert-file", &certs.cert, "--tls-key-file", &certs.key])
        .args(["--tls-ca-cert-file", &certs.ca, "--tls-auth-clients", "no"])
        .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
        .args(["--user", "default", "off"])
        .args([
            "--user",
            "datasync",
            "on",
            ">acl-pass-0123",
            "~*",
            "&*",
            "+@all",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server runs");
    SecureRedis { child, port }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_round_trip_runs_against_a_redis_with_tls_and_an_acl_user() {
    let ns = Namespace::new("redis-tls");
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let redis = start_secure_redis(dir.path(), &certs);
    let secure = |user_pass: &str| {
        config_with(
            &ns,
            &format!(
                "[redis]\nurl = \"rediss://{user_pass}@127.0.0.1:{}\"\ntls_ca = \"{}\"\n",
                redis.port, certs.ca
            ),
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let store = loop {
        let c = secure("datasync:acl-pass-0123");
        match datasync::clients::redis::RedisStore::connect(&c.redis, 8).await {
            Ok(s) => break s,
            Err(_) if std::time::Instant::now() < deadline => tokio::task::yield_now().await,
            Err(e) => panic!("the TLS Redis never answered: {e}"),
        }
    };
    drop(store);
    // A wrong password is refused, and so is a client without TLS.
    let wrong = secure("datasync:wrong");
    assert!(
        datasync::clients::redis::RedisStore::connect(&wrong.redis, 8)
            .await
            .is_err()
    );
    let mut plain = secure("datasync:acl-pass-0123");
    plain.redis.url = datasync::config::Secret::new(format!(
        "redis://datasync:acl-pass-0123@127.0.0.1:{}",
        redis.port
    ));
    assert!(
        tokio::time::timeout(
            Duration::from_secs(10),
            datasync::clients::redis::RedisStore::connect(&plain.redis, 8)
        )
        .await
        .map(|r| r.is_err())
        .unwrap_or(true)
    );

    let engine = start_with(secure("datasync:acl-pass-0123")).await;
    let writes: Vec<_> = (0..200)
        .map(|i| profile(&format!("{ns}-u{i}"), 1))
        .collect();
    engine.write_and_mark(&writes).await.unwrap();
    let m = mongo(&ns).await;
    wait_until(
        "200 users applied through the TLS Redis",
        Duration::from_secs(120),
        || {
            let m = m.clone();
            async move { count_docs(&m, doc! {}).await == 200 }
        },
    )
    .await;
    engine.shutdown(Duration::from_secs(20)).await;
    cleanup(&ns).await;
}
