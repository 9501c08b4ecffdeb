//! Lock tokens: 128 bits from the operating system's CSPRNG, as 32 hex digits.

use std::sync::Arc;

use crate::error::Error;

/// Bytes of randomness in a token.
const TOKEN_BYTES: usize = 16;

/// A fresh random token.
pub(crate) fn generate() -> Result<Arc<str>, Error> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes).map_err(|err| Error::Entropy(err.to_string()))?;
    Ok(hex(&bytes).into())
}

/// Lower-case hex digits of `bytes`, by table: formatting machinery is most of
/// the cost of a token otherwise.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    hex
}

/// The first few characters of a token, enough to tell tokens apart in logs
/// without handing out the token itself.
pub(crate) fn abbreviate(token: &str) -> &str {
    token.get(..6).unwrap_or(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn tokens_are_128_bit_hex_and_distinct() {
        let tokens: HashSet<_> = (0..1000).map(|_| generate().unwrap()).collect();
        assert_eq!(tokens.len(), 1000);
        for token in &tokens {
            assert_eq!(token.len(), 32);
            assert!(token.chars().all(|c| c.is_ascii_hexdigit()));
        }
    }
}
