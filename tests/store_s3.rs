//! The object-store layer against a real S3-compatible server (moto on loopback): whole
//! objects, create-if-absent with one winner among concurrent creators, listing, deletes,
//! multipart file transfers, and an unreachable store failing in bounded time as
//! `Unavailable`.

#[path = "common/s3.rs"]
mod s3;

use esft::store::{Store, StoreError, Timeouts};
use s3::S3Server;
use std::time::{Duration, Instant};

fn store(s3: &S3Server, prefix: &str, timeouts: &Timeouts) -> Store {
    Store::open_with(&s3.url(prefix), timeouts, &s3.options()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_keeps_the_store_contract() {
    let Some(s3) = S3Server::start() else { return };
    let store = store(&s3, "contract", &Timeouts::default());

    assert_eq!(store.get("a/b.json").await.unwrap(), None);
    store.put("a/b.json", b"one".to_vec()).await.unwrap();
    assert_eq!(
        store.get("a/b.json").await.unwrap().unwrap().as_ref(),
        b"one"
    );
    assert_eq!(store.size("a/b.json").await.unwrap(), Some(3));

    // Of many concurrent creators of one key, exactly one wins, and its bytes stay.
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { (i, store.create("race", vec![i as u8; 16]).await) })
        })
        .collect();
    let mut winners = Vec::new();
    for r in racers {
        let (i, result) = r.await.unwrap();
        match result {
            Ok(()) => winners.push(i),
            Err(StoreError::Exists { .. }) => {}
            Err(e) => panic!("racer {i}: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let kept = store.get("race").await.unwrap().unwrap();
    assert_eq!(kept.as_ref(), &[winners[0] as u8; 16]);

    // Listing is below the prefix only, and keys come back relative to it.
    let other = self::store(&s3, "elsewhere", &Timeouts::default());
    other.put("a/x", b"x".to_vec()).await.unwrap();
    let mut keys: Vec<String> = store
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    keys.sort();
    assert_eq!(keys, ["a/b.json", "race"]);

    store.delete("race").await.unwrap();
    store.delete("race").await.unwrap();
    assert_eq!(store.get("race").await.unwrap(), None);
    store.create("race", b"again".to_vec()).await.unwrap();

    // A file above the multipart threshold goes up in parts and comes down whole.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.bin");
    let data: Vec<u8> = (0..(70usize << 20) + 5).map(|i| (i % 253) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    store.upload_file("files/big.bin", &src).await.unwrap();
    let dest = dir.path().join("back.bin");
    let n = store.download_file("files/big.bin", &dest).await.unwrap();
    assert_eq!(n, Some(data.len() as u64));
    assert!(std::fs::read(&dest).unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresponsive_store_fails_in_bounded_time_and_recovers() {
    let Some(s3) = S3Server::start() else { return };
    let timeouts = Timeouts {
        connect: Duration::from_secs(1),
        request: Duration::from_secs(1),
        retries: Duration::from_secs(2),
    };
    let store = store(&s3, "faults", &timeouts);
    store.put("k", b"v".to_vec()).await.unwrap();

    s3.pause();
    let t = Instant::now();
    let got = store.get("k").await;
    let took = t.elapsed();
    s3.resume();
    assert!(matches!(got, Err(ref e) if e.is_unavailable()), "{got:?}");
    assert!(took < Duration::from_secs(15), "took {took:?}");

    assert_eq!(store.get("k").await.unwrap().unwrap().as_ref(), b"v");
}
