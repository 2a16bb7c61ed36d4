//! Values stored in sled as chunks of at most [`CHUNK`] bytes, so that sled never writes a
//! value to a blob file.
//!
//! sled 0.34.7 writes a page larger than a quarter of its 512 KiB segment (about 128 KiB) to
//! a file of its own under `blobs/`, and never fsyncs it: only the main `db` file is synced. A log entry of a few thousand devices, a snapshot, or
//! a leaf page of 17 middling entries would thus be acknowledged while it sat in the page
//! cache, and a power cut could lose it or leave a torn blob that the store will not read.
//! Chunked, every page stays far below the threshold (a leaf splits past 16 items, and 17
//! chunks of 4 KiB are 68 KiB), so everything sled writes goes to the main file, which
//! [`crate::store`] fsyncs before it acknowledges.
//!
//! Layout: a value under `prefix` is the keys `prefix ++ n` (`n` a big-endian `u32`, from 0),
//! so the chunks of one value are adjacent and in order, and values keep the order of their
//! prefixes. Chunk 0 starts with the value's total length (`u64`, big-endian), which a reader
//! checks. A value is written and replaced in one sled batch, which sled applies atomically.

/// Largest chunk stored (bytes of the value; chunk 0 carries 8 more for the length).
pub const CHUNK: usize = 4 * 1024;

/// Key of chunk `n` of the value under `prefix`.
pub fn chunk_key(prefix: &[u8], n: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 4);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// The chunks of `value` under `prefix`, as `(key, bytes)` pairs in key order.
pub fn chunks(prefix: &[u8], value: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::with_capacity(value.len() / CHUNK + 1);
    let first = value.len().min(CHUNK);
    let mut head = Vec::with_capacity(8 + first);
    head.extend_from_slice(&(value.len() as u64).to_be_bytes());
    head.extend_from_slice(&value[..first]);
    out.push((chunk_key(prefix, 0), head));
    for (i, part) in value[first..].chunks(CHUNK).enumerate() {
        out.push((chunk_key(prefix, i as u32 + 1), part.to_vec()));
    }
    out
}

/// Adds the writes that store `value` under `prefix` to `batch`, replacing whatever value was
/// there (`old_chunks` is how many chunks it had).
pub fn put(batch: &mut sled::Batch, prefix: &[u8], value: &[u8], old_chunks: u32) {
    let new = chunks(prefix, value);
    for n in new.len() as u32..old_chunks {
        batch.remove(chunk_key(prefix, n));
    }
    for (k, v) in new {
        batch.insert(k, v);
    }
}

/// Why stored chunks do not make a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// A key does not have the chunked layout.
    #[error("key {key:02x?} is not a chunk key (expected {prefix_len} + 4 bytes)")]
    BadKey {
        /// The key.
        key: Vec<u8>,
        /// The prefix length expected.
        prefix_len: usize,
    },
    /// Chunks are missing, out of order, or add up to another length than recorded.
    #[error("value {prefix:02x?} is incomplete: {why}")]
    Incomplete {
        /// The value's prefix.
        prefix: Vec<u8>,
        /// What is wrong.
        why: String,
    },
}

/// Reassembles values from `(key, chunk)` pairs in key order whose keys are a
/// `prefix_len`-byte prefix plus a chunk number: yields `(prefix, value)` per value.
pub struct Assemble<I: Iterator> {
    inner: std::iter::Peekable<I>,
    prefix_len: usize,
}

impl<I> Assemble<I>
where
    I: Iterator<Item = Result<(sled::IVec, sled::IVec), sled::Error>>,
{
    /// Reassembles the pairs of `inner`.
    pub fn new(inner: I, prefix_len: usize) -> Self {
        Self {
            inner: inner.peekable(),
            prefix_len,
        }
    }
}

/// What reading chunks can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// sled failed.
    #[error(transparent)]
    Sled(#[from] sled::Error),
    /// The stored chunks are not a value.
    #[error(transparent)]
    Chunks(#[from] ChunkError),
}

impl<I> Iterator for Assemble<I>
where
    I: Iterator<Item = Result<(sled::IVec, sled::IVec), sled::Error>>,
{
    type Item = Result<(Vec<u8>, Vec<u8>), ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        let (key, first) = match self.inner.next()? {
            Ok(kv) => kv,
            Err(e) => return Some(Err(e.into())),
        };
        Some(self.assemble(key, first))
    }
}

impl<I> Assemble<I>
where
    I: Iterator<Item = Result<(sled::IVec, sled::IVec), sled::Error>>,
{
    fn assemble(
        &mut self,
        key: sled::IVec,
        first: sled::IVec,
    ) -> Result<(Vec<u8>, Vec<u8>), ReadError> {
        let (prefix, n) = split(self.prefix_len, &key)?;
        let incomplete = |why: String| ChunkError::Incomplete {
            prefix: prefix.to_vec(),
            why,
        };
        if n != 0 {
            return Err(incomplete(format!("starts at chunk {n}, not 0")).into());
        }
        if first.len() < 8 {
            return Err(incomplete("chunk 0 is shorter than its length field".into()).into());
        }
        let mut length = [0u8; 8];
        length.copy_from_slice(&first[..8]);
        let total = u64::from_be_bytes(length);
        let mut value = Vec::with_capacity(total.min(1 << 30) as usize);
        value.extend_from_slice(&first[8..]);
        let mut expect = 1u32;
        while (value.len() as u64) < total {
            let (k, v) = match self.inner.next() {
                Some(kv) => kv?,
                None => {
                    return Err(incomplete(format!(
                        "{} of {total} bytes, chunk {expect} missing",
                        value.len()
                    ))
                    .into());
                }
            };
            let (p, n) = split(self.prefix_len, &k)?;
            if p != prefix || n != expect {
                return Err(incomplete(format!("chunk {expect} missing")).into());
            }
            value.extend_from_slice(&v);
            expect += 1;
        }
        if value.len() as u64 != total {
            return Err(incomplete(format!("{} bytes, recorded {total}", value.len())).into());
        }
        // A leftover chunk of this prefix (more than the length says) is corruption too.
        if let Some(Ok((k, _))) = self.inner.peek()
            && let Ok((p, _)) = split(self.prefix_len, k)
            && p == prefix
        {
            return Err(incomplete(format!("more chunks than its {total} bytes")).into());
        }
        Ok((prefix.to_vec(), value))
    }
}

/// A chunk key's prefix and chunk number.
fn split(prefix_len: usize, key: &[u8]) -> Result<(&[u8], u32), ChunkError> {
    if key.len() != prefix_len + 4 {
        return Err(ChunkError::BadKey {
            key: key.to_vec(),
            prefix_len,
        });
    }
    let (prefix, n) = key.split_at(prefix_len);
    let mut number = [0u8; 4];
    number.copy_from_slice(n);
    Ok((prefix, u32::from_be_bytes(number)))
}

/// How many chunks the value under `prefix` in `tree` has (0: none).
pub fn count(tree: &sled::Tree, prefix: &[u8]) -> Result<u32, sled::Error> {
    let mut n = 0;
    for kv in tree.scan_prefix(prefix) {
        let (k, _) = kv?;
        if k.len() == prefix.len() + 4 {
            n += 1;
        }
    }
    Ok(n)
}

/// The value under `prefix` in `tree`, if any.
pub fn get(tree: &sled::Tree, prefix: &[u8]) -> Result<Option<Vec<u8>>, ReadError> {
    let pairs = tree.scan_prefix(prefix).filter(|kv| {
        kv.as_ref()
            .map_or(true, |(k, _)| k.len() == prefix.len() + 4)
    });
    match Assemble::new(pairs, prefix.len()).next() {
        None => Ok(None),
        Some(r) => r.map(|(_, v)| Some(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, sled::Db, sled::Tree) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let t = db.open_tree("t").unwrap();
        (dir, db, t)
    }

    #[test]
    fn values_round_trip_through_chunks_of_every_size() {
        let (_d, _db, t) = tree();
        let sizes = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17, 700_000];
        let mut batch = sled::Batch::default();
        for (i, size) in sizes.iter().enumerate() {
            let value: Vec<u8> = (0..*size).map(|b| (b * 7 + i) as u8).collect();
            for (_, c) in chunks(&(i as u64).to_be_bytes(), &value) {
                assert!(c.len() <= CHUNK + 8);
            }
            put(&mut batch, &(i as u64).to_be_bytes(), &value, 0);
        }
        t.apply_batch(batch).unwrap();
        let got: Vec<_> = Assemble::new(t.iter(), 8)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got.len(), sizes.len());
        for (i, (prefix, value)) in got.iter().enumerate() {
            assert_eq!(prefix, &(i as u64).to_be_bytes());
            assert_eq!(value.len(), sizes[i]);
            assert!(
                value
                    .iter()
                    .enumerate()
                    .all(|(b, v)| *v == (b * 7 + i) as u8)
            );
        }
        // Replacing a long value by a short one leaves no chunk of the old behind.
        let p = 6u64.to_be_bytes();
        let old = count(&t, &p).unwrap();
        let mut batch = sled::Batch::default();
        put(&mut batch, &p, b"short", old);
        t.apply_batch(batch).unwrap();
        assert_eq!(count(&t, &p).unwrap(), 1);
        assert_eq!(get(&t, &p).unwrap().as_deref(), Some(&b"short"[..]));
    }

    #[test]
    fn missing_or_extra_chunks_are_reported_not_glued() {
        let (_d, _db, t) = tree();
        let value = vec![9u8; 3 * CHUNK];
        for (missing, extra) in [(Some(2u32), None), (Some(0), None), (None, Some(9u32))] {
            t.clear().unwrap();
            let mut batch = sled::Batch::default();
            put(&mut batch, b"p", &value, 0);
            t.apply_batch(batch).unwrap();
            if let Some(n) = missing {
                t.remove(chunk_key(b"p", n)).unwrap();
            }
            if let Some(n) = extra {
                t.insert(chunk_key(b"p", n), b"x".as_slice()).unwrap();
            }
            let err = get(&t, b"p").expect_err("a broken value is refused");
            assert!(err.to_string().contains("incomplete"), "{err}");
        }
        t.clear().unwrap();
        t.insert(b"p12", b"x".as_slice()).unwrap();
        let err = Assemble::new(t.iter(), 1).next().unwrap().unwrap_err();
        assert!(err.to_string().contains("not a chunk key"), "{err}");
    }
}
