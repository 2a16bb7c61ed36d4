//! Length-prefixed frames on QUIC streams: a 4-byte big-endian length, then that many bytes.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Largest frame a peer may send; larger announcements close the stream before any allocation.
pub const MAX_FRAME: usize = 16 << 20;

/// Largest frame a certificate that is not a member may send: enough to ask who a node is.
pub const STRANGER_FRAME: usize = 64 << 10;

/// The budget frames are read against is counted in units of this many bytes.
const BUDGET_UNIT: usize = 1 << 10;

/// Memory that frames being received may hold at once, shared by every stream of every
/// connection it is given to: a frame waits for room before its bytes are read, so no set of
/// peers can make a node hold more than the budget in received requests, however many streams
/// they open.
#[derive(Clone, Debug)]
pub struct FrameBudget {
    units: Arc<Semaphore>,
    total: usize,
}

impl FrameBudget {
    /// A budget of `bytes` (at least one largest frame's worth is sensible).
    pub fn new(bytes: usize) -> Self {
        let total = bytes.div_ceil(BUDGET_UNIT).max(1);
        FrameBudget {
            units: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Bytes not held by frames now.
    pub fn available(&self) -> usize {
        self.units.available_permits() * BUDGET_UNIT
    }

    async fn reserve(&self, len: usize) -> Result<OwnedSemaphorePermit, FrameError> {
        let units = len.div_ceil(BUDGET_UNIT).clamp(1, self.total);
        let units = u32::try_from(units).map_err(|_| FrameError::TooLarge {
            len,
            max: self.total * BUDGET_UNIT,
        })?;
        self.units
            .clone()
            .acquire_many_owned(units)
            .await
            .map_err(|_| FrameError::Io(std::io::Error::other("frame budget closed")))
    }
}

/// A frame read against a [`FrameBudget`]: its bytes count against the budget until dropped.
#[derive(Debug)]
pub struct BudgetedFrame {
    /// The frame's bytes.
    pub bytes: Vec<u8>,
    _held: OwnedSemaphorePermit,
}

/// Reads one frame of at most `max` bytes, waiting for room in `budget` once its length is
/// known and before reading (or allocating for) its bytes. `Ok(None)`: the stream ended cleanly.
pub async fn read_frame_within<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    budget: &FrameBudget,
) -> Result<Option<BudgetedFrame>, FrameError> {
    let Some(len) = read_length(r, max).await? else {
        return Ok(None);
    };
    let held = budget.reserve(len).await?;
    let mut bytes = vec![0u8; len];
    r.read_exact(&mut bytes).await?;
    Ok(Some(BudgetedFrame { bytes, _held: held }))
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced more than the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The stream ended or failed mid-frame.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads a frame's length and checks it against `max`. `Ok(None)`: the stream ended cleanly.
async fn read_length<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<usize>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(Some(len))
}

/// Reads one frame of at most `max` bytes. `Ok(None)` means the stream ended cleanly before a frame.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let Some(len) = read_length(r, max).await? else {
        return Ok(None);
    };
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

/// Writes one frame; the caller guarantees `bytes.len() <= MAX_FRAME`.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    let len =
        u32::try_from(bytes.len()).map_err(|_| std::io::Error::other("frame longer than 4 GiB"))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(bytes).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_limits() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").await.unwrap();
        write_frame(&mut buf, b"").await.unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r, 16).await.unwrap().unwrap(), b"hello");
        assert_eq!(read_frame(&mut r, 16).await.unwrap().unwrap(), b"");
        assert!(read_frame(&mut r, 16).await.unwrap().is_none());

        let huge = (u32::MAX).to_be_bytes();
        let mut r = &huge[..];
        assert!(matches!(
            read_frame(&mut r, MAX_FRAME).await,
            Err(FrameError::TooLarge { .. })
        ));

        let mut cut = Vec::new();
        write_frame(&mut cut, b"hello").await.unwrap();
        cut.truncate(6);
        let mut r = &cut[..];
        assert!(matches!(
            read_frame(&mut r, 16).await,
            Err(FrameError::Io(_))
        ));
    }

    #[tokio::test]
    async fn frames_wait_for_room_in_the_budget() {
        let budget = FrameBudget::new(8 << 10);
        let mut buf = Vec::new();
        write_frame(&mut buf, &[1u8; 6 << 10]).await.unwrap();
        write_frame(&mut buf, &[2u8; 4 << 10]).await.unwrap();
        let mut r = &buf[..];
        let first = read_frame_within(&mut r, 16 << 10, &budget)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.bytes.len(), 6 << 10);
        assert_eq!(budget.available(), 2 << 10);
        // The second does not fit while the first is held: it waits.
        let mut rest = r;
        let second = read_frame_within(&mut rest, 16 << 10, &budget);
        tokio::pin!(second);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), &mut second)
                .await
                .is_err(),
            "read beyond the budget"
        );
        drop(first);
        let second = second.await.unwrap().unwrap();
        assert_eq!(second.bytes, vec![2u8; 4 << 10]);
        drop(second);
        assert_eq!(budget.available(), 8 << 10);
        // Over the limit: refused before anything is reserved or read.
        let huge = (1u32 << 20).to_be_bytes();
        let mut r = &huge[..];
        assert!(matches!(
            read_frame_within(&mut r, STRANGER_FRAME, &budget).await,
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(budget.available(), 8 << 10);
    }
}
