//! One bincode configuration for everything spaced writes to disk or the wire.

use serde::{Serialize, de::DeserializeOwned};

/// Why bytes could not be turned into a value (or back).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Encoding failed (only on values serde cannot express).
    #[error("encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// The bytes are not a valid encoding of the expected type.
    #[error("decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// The bytes decode but leave trailing garbage.
    #[error("decode: {0} trailing bytes")]
    Trailing(usize),
}

fn config() -> impl bincode::config::Config {
    // Limit guards against a length prefix inside the payload asking for a huge allocation.
    bincode::config::standard().with_limit::<{ 1 << 30 }>()
}

/// Encodes a value with spaced's bincode configuration.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(bincode::serde::encode_to_vec(value, config())?)
}

/// Decodes a whole buffer; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

/// Decodes one value from the start of `bytes` and says how many bytes it took (the fuzz
/// targets read a sequence of commands this way).
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), CodecError> {
    Ok(bincode::serde::decode_from_slice(bytes, config())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes as a sequence of `u8`, the way fields were declared before they were marked
    /// `serde_bytes` (decoded a byte at a time, most of a busy leader's time).
    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct AsSeq {
        v: Vec<u8>,
        after: u64,
    }

    /// The same fields as bytes.
    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct AsBytes {
        #[serde(with = "serde_bytes")]
        v: Vec<u8>,
        after: u64,
    }

    #[test]
    fn bytes_fields_keep_the_encoding_of_byte_sequences() {
        // So data dirs and peers that wrote the old declaration still decode, both ways.
        for len in [0usize, 1, 250, 251, 1280, 70_000] {
            let v: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let seq = encode(&AsSeq {
                v: v.clone(),
                after: 9,
            })
            .unwrap();
            let bytes = encode(&AsBytes {
                v: v.clone(),
                after: 9,
            })
            .unwrap();
            assert_eq!(seq, bytes, "length {len}");
            assert_eq!(
                decode::<AsBytes>(&seq).unwrap(),
                AsBytes {
                    v: v.clone(),
                    after: 9
                }
            );
            assert_eq!(decode::<AsSeq>(&bytes).unwrap(), AsSeq { v, after: 9 });
        }
    }
}
