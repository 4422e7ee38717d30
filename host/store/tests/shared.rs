//! The shared store against a real PostgreSQL and a real S3 API (SeaweedFS), both started by
//! the test (see `weft-testkit`): changes committed through one replica's store are read by another's after
//! a refresh or a notification; concurrent writers on two replicas are serialized (a public key
//! registered by two tenants at once lands once); a failed change writes nothing; a deleted
//! tenant disappears everywhere; the schema is applied once however many replicas start; and a
//! database restart leaves the store serving its snapshot and writing again afterwards; a blob
//! stored through one replica (small, or large enough for a multipart upload) is read by another
//! from the object store, and an object whose bytes do not match its name is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_core::ErrorKind;
use weft_store::s3::{S3Blobs, S3Settings};
use weft_store::{GraphVersion, Quotas, SigningKey, Store, Tenant};
use weft_testkit::{Postgres, SeaweedS3};

/// One SeaweedFS per test binary would be cheaper, but a static server is never stopped; each
/// test starts its own (a few seconds) and uses its own prefix anyway.
struct Shared {
    postgres: Postgres,
    s3: SeaweedS3,
    url: String,
}

impl Shared {
    fn start() -> Shared {
        let postgres = Postgres::start();
        let url = postgres.create_database();
        Shared {
            postgres,
            s3: SeaweedS3::start(),
            url,
        }
    }

    fn settings(&self) -> S3Settings {
        S3Settings {
            endpoint: Some(self.s3.endpoint()),
            region: Some("us-east-1".into()),
            access_key_id: Some(self.s3.access_key().into()),
            secret_access_key: Some(self.s3.secret_key().into()),
            session_token: None,
        }
    }

    fn blobs(&self) -> S3Blobs {
        S3Blobs::connect(&self.s3.blob_url("test"), &self.settings()).unwrap()
    }

    fn replica(&self) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_shared(dir.path(), &self.url, self.blobs()).unwrap();
        (dir, store)
    }
}

fn add_tenant(store: &Store, name: &str) {
    store
        .transact(|state| {
            state
                .tenants
                .insert(name.into(), Tenant::new(name, 1, Quotas::default()));
            Ok(())
        })
        .unwrap();
}

fn key(id: &str) -> SigningKey {
    SigningKey {
        id: id.into(),
        public_key: format!("public-{id}"),
        created_unix: 1,
        revoked: false,
    }
}

#[test]
fn a_change_on_one_replica_is_seen_by_another_after_refresh_and_by_notification() {
    let shared = Shared::start();
    let (_a_dir, a) = shared.replica();
    let (_b_dir, b) = shared.replica();
    let mut changes = b.shared().unwrap().listen().unwrap();

    add_tenant(&a, "acme");
    assert!(a.state().tenants.contains_key("acme"));
    assert_eq!(a.state().revision, 1);

    // b hears of it within a second, and a refresh brings it in.
    let heard = Instant::now();
    let revision = loop {
        match changes.try_recv() {
            Ok(Some(revision)) => break revision,
            Ok(None) | Err(_) if heard.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => panic!("no notification within 5 s: {other:?}"),
        }
    };
    assert!(
        heard.elapsed() < Duration::from_secs(1),
        "{:?}",
        heard.elapsed()
    );
    assert_eq!(revision, 1);
    assert!(
        !b.state().tenants.contains_key("acme"),
        "not before refresh"
    );
    assert!(b.shared().unwrap().refresh().unwrap());
    assert_eq!(b.state().tenants["acme"], a.state().tenants["acme"]);
    assert_eq!(b.state().revision, 1);
    assert!(!b.shared().unwrap().refresh().unwrap(), "nothing new");

    // A change that fails its check (it references a blob that is not stored) writes nothing.
    b.transact(|state| {
        state.tenants.get_mut("acme").unwrap().graphs.insert(
            "g".into(),
            [(
                1,
                GraphVersion {
                    toml_digest: "0".repeat(64),
                    size: 0,
                    created_unix: 1,
                },
            )]
            .into(),
        );
        Ok(())
    })
    .expect_err("the blob is not stored: refused before anything is written");
    // b changes the tenant; a decides its next change on b's (without a refresh of its own).
    b.transact(|state| {
        state.tenants.get_mut("acme").unwrap().shared_models = vec!["mlp".into()];
        Ok(())
    })
    .unwrap();
    a.transact(|state| {
        let acme = state.tenants.get_mut("acme").unwrap();
        assert_eq!(acme.shared_models, ["mlp"], "a decides on b's change");
        acme.shared_models.push("labeler".into());
        Ok(())
    })
    .unwrap();
    b.shared().unwrap().refresh().unwrap();
    assert_eq!(b.state().tenants["acme"].shared_models, ["mlp", "labeler"]);
    assert_eq!(b.state().revision, a.state().revision);
    assert!(b.state().tenants["acme"].graphs.is_empty());

    // A delete on a reaches b.
    a.transact(|state| {
        state.tenants.remove("acme");
        Ok(())
    })
    .unwrap();
    b.shared().unwrap().refresh().unwrap();
    assert!(b.state().tenants.is_empty());

    // A third replica starting later loads everything (the schema is there already).
    add_tenant(&b, "later");
    let (_c_dir, c) = shared.replica();
    assert_eq!(c.state().tenants.keys().collect::<Vec<_>>(), ["later"]);
    assert_eq!(c.state().revision, b.state().revision);
}

#[test]
fn concurrent_writers_on_two_replicas_are_serialized() {
    let shared = Shared::start();
    let (_a_dir, a) = shared.replica();
    let (_b_dir, b) = shared.replica();
    add_tenant(&a, "one");
    add_tenant(&a, "two");
    b.shared().unwrap().refresh().unwrap();
    let (a, b) = (Arc::new(a), Arc::new(b));

    // The same public key registered for two tenants through two replicas at once: exactly one
    // wins, the other gets the conflict (the cross-tenant check saw the winner's commit).
    let mut attempts = Vec::new();
    for (store, tenant) in [(Arc::clone(&a), "one"), (Arc::clone(&b), "two")] {
        attempts.push(std::thread::spawn(move || {
            store.transact(|state| state.register_signing_key(tenant, key("k1")))
        }));
    }
    let outcomes: Vec<_> = attempts.into_iter().map(|t| t.join().unwrap()).collect();
    let won = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(won, 1, "{outcomes:?}");
    let lost = outcomes.iter().find_map(|o| o.as_ref().err()).unwrap();
    assert_eq!(lost.kind(), ErrorKind::Conflict, "{lost}");

    // 40 increments from two replicas in parallel: none is lost.
    let mut writers = Vec::new();
    for store in [Arc::clone(&a), Arc::clone(&b)] {
        writers.push(std::thread::spawn(move || {
            for _ in 0..20 {
                store
                    .transact(|state| {
                        let one = state.tenants.get_mut("one").unwrap();
                        one.quotas.burst += 1;
                        Ok(())
                    })
                    .unwrap();
            }
        }));
    }
    for writer in writers {
        writer.join().unwrap();
    }
    a.shared().unwrap().refresh().unwrap();
    assert_eq!(
        a.state().tenants["one"].quotas.burst,
        Quotas::default().burst + 40
    );
    let keys: usize = a
        .state()
        .tenants
        .values()
        .map(|tenant| tenant.signing_keys.len())
        .sum();
    assert_eq!(keys, 1);
}

#[test]
fn a_database_restart_keeps_the_snapshot_and_writes_resume() {
    let shared = Shared::start();
    let postgres = &shared.postgres;
    let (_dir, store) = shared.replica();
    add_tenant(&store, "acme");

    postgres.stop();
    // Reads keep being served from the snapshot; a write fails with a clear error.
    assert!(store.state().tenants.contains_key("acme"));
    let error = store
        .transact(|state| {
            state.tenants.remove("acme");
            Ok(())
        })
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    assert!(error.to_string().contains("database"), "{error}");
    assert!(
        !error.to_string().contains("postgres://"),
        "no URL in errors: {error}"
    );
    assert!(store.state().tenants.contains_key("acme"));

    postgres.restart();
    let started = Instant::now();
    loop {
        match store.transact(|state| {
            state
                .tenants
                .insert("after".into(), Tenant::new("after", 2, Quotas::default()));
            Ok(())
        }) {
            Ok(()) => break,
            Err(error) if started.elapsed() < Duration::from_secs(20) => {
                assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(error) => panic!(
                "no write 20 s after the restart: {error}\n{}",
                postgres.log()
            ),
        }
    }
    let (_again_dir, again) = shared.replica();
    let names: Vec<_> = again.state().tenants.keys().cloned().collect();
    assert_eq!(names, ["acme", "after"]);
}

#[test]
fn a_bad_database_or_blob_url_is_a_clear_error_without_secrets() {
    let shared = Shared::start();
    let dir = tempfile::tempdir().unwrap();
    let error =
        Store::open_shared(dir.path(), "mysql://user:hunter2@host/db", shared.blobs()).unwrap_err();
    assert!(!error.to_string().contains("hunter2"), "{error}");
    let error = Store::open_shared(
        dir.path(),
        "postgres://user:hunter2@127.0.0.1:1/db",
        shared.blobs(),
    )
    .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    assert!(!error.to_string().contains("hunter2"), "{error}");

    let error = S3Blobs::connect("http://weft/x", &shared.settings()).unwrap_err();
    assert!(error.to_string().contains("s3://bucket"), "{error}");
    let wrong = S3Settings {
        secret_access_key: Some("not-the-secret".into()),
        ..shared.settings()
    };
    let error = S3Blobs::connect(&shared.s3.blob_url("x"), &wrong).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    assert!(!error.to_string().contains("not-the-secret"), "{error}");
}

#[test]
fn a_blob_stored_through_one_replica_is_read_by_another_from_the_object_store() {
    let shared = Shared::start();
    let (_a_dir, a) = shared.replica();
    let (b_dir, b) = shared.replica();
    add_tenant(&a, "acme");

    let small = b"name = \"g\"\n".to_vec();
    // Over one multipart part (8 MiB): goes up in parts.
    let large: Vec<u8> = (0..(12u32 << 20)).map(|i| (i % 251) as u8).collect();
    let small_digest = a.put_blob(&small).unwrap();
    let large_digest = a.put_blob(&large).unwrap();
    a.transact(|state| {
        let graphs = &mut state.tenants.get_mut("acme").unwrap().graphs;
        for (name, digest) in [("small", &small_digest), ("large", &large_digest)] {
            graphs.insert(
                name.into(),
                [(
                    1,
                    GraphVersion {
                        toml_digest: digest.clone(),
                        size: 0,
                        created_unix: 1,
                    },
                )]
                .into(),
            );
        }
        Ok(())
    })
    .unwrap();

    b.shared().unwrap().refresh().unwrap();
    assert!(b.has_blob(&small_digest));
    assert_eq!(b.read_blob(&small_digest).unwrap(), small);
    assert_eq!(b.read_blob(&large_digest).unwrap(), large);
    // Now cached in b's own directory.
    assert!(
        b_dir
            .path()
            .join("store/blobs/sha256")
            .join(&large_digest)
            .is_file()
    );

    // An object whose bytes are not what its name says is never used.
    let liar = "1".repeat(64);
    let file = b_dir.path().join("liar");
    std::fs::write(&file, b"not what the name says").unwrap();
    shared.blobs().upload(&liar, &file).unwrap();
    let error = b.read_blob(&liar).unwrap_err();
    assert!(error.to_string().contains("does not match"), "{error}");
    assert!(
        !b_dir.path().join("store/blobs/sha256").join(&liar).exists(),
        "a bad download is not kept"
    );
    // A digest stored nowhere is "not stored".
    let error = b.read_blob(&"2".repeat(64)).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotFound, "{error}");
}

#[test]
fn migrate_copies_an_embedded_store_into_a_shared_one_and_back_verified() {
    let shared = Shared::start();
    let embedded_dir = tempfile::tempdir().unwrap();
    let embedded = Store::open(embedded_dir.path()).unwrap();
    let digest = embedded.put_blob(b"name = \"g\"\n").unwrap();
    embedded
        .transact(|state| {
            let mut tenant = Tenant::new("acme", 1, Quotas::default());
            tenant.graphs.insert(
                "g".into(),
                [(
                    1,
                    GraphVersion {
                        toml_digest: digest.clone(),
                        size: 11,
                        created_unix: 1,
                    },
                )]
                .into(),
            );
            state.tenants.insert("acme".into(), tenant);
            Ok(())
        })
        .unwrap();

    let (_dir, target) = shared.replica();
    let copied = weft_store::migrate::migrate(&embedded, &target).unwrap();
    assert_eq!((copied.tenants, copied.blobs, copied.bytes), (1, 1, 11));
    assert_eq!(target.state().tenants, embedded.state().tenants);
    // Another replica reads it all from PostgreSQL and S3.
    let (_other_dir, other) = shared.replica();
    assert_eq!(other.read_blob(&digest).unwrap(), b"name = \"g\"\n");

    // A second migration into the now non-empty store is refused, changing nothing.
    let error = weft_store::migrate::migrate(&embedded, &target).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Conflict, "{error}");

    // And back into a fresh embedded store.
    let back_dir = tempfile::tempdir().unwrap();
    let back = Store::open(back_dir.path()).unwrap();
    weft_store::migrate::migrate(&other, &back).unwrap();
    assert_eq!(back.state().tenants, embedded.state().tenants);
    assert_eq!(back.read_blob(&digest).unwrap(), b"name = \"g\"\n");
}
