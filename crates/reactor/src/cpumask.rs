//! CPU masks as SPDK writes them (`0x3`, `3`) or as core lists (`[0,1]`, `0-3`, `0,2`).

use std::fmt;

/// Highest core number a mask may name. Masks beyond this are rejected, not truncated.
pub const MAX_CORES: usize = 1024;

/// A set of CPU cores, kept sorted and free of duplicates.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct CpuMask {
    cores: Vec<usize>,
}

/// Why a cpumask string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuMaskError {
    #[error("cpumask '{0}' is empty: it must name at least one core")]
    Empty(String),
    #[error("cpumask '{mask}': '{part}' is not a hex mask or a core number")]
    Syntax { mask: String, part: String },
    #[error("cpumask '{mask}': core {core} is beyond the supported maximum of {max}")]
    TooLarge { mask: String, core: usize, max: usize },
    #[error("cpumask '{mask}': range '{part}' runs backwards")]
    Backwards { mask: String, part: String },
}

impl CpuMask {
    /// Parses SPDK's formats: a hex mask with or without `0x` (`0x3`, `3` = cores 0 and 1), or a core
    /// list in brackets (`[0,2-3]`). A bare list with `,` or `-` (`0,1`, `0-3`) is read as a core list.
    pub fn parse(s: &str) -> Result<Self, CpuMaskError> {
        let t = s.trim();
        if t.is_empty() {
            return Err(CpuMaskError::Empty(s.to_string()));
        }
        let is_list = t.starts_with('[') || t.contains(',') || (t.contains('-') && !t.starts_with("0x"));
        let mask = if is_list {
            let inner = t.trim_start_matches('[').trim_end_matches(']');
            Self::parse_list(s, inner)?
        } else {
            Self::parse_hex(s, t)?
        };
        if mask.cores.is_empty() {
            return Err(CpuMaskError::Empty(s.to_string()));
        }
        Ok(mask)
    }

    fn parse_hex(orig: &str, t: &str) -> Result<Self, CpuMaskError> {
        let hex = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CpuMaskError::Syntax { mask: orig.to_string(), part: t.to_string() });
        }
        let mut cores = Vec::new();
        // Walk the digits from least significant; each nibble covers four cores.
        for (nibble_idx, ch) in hex.bytes().rev().enumerate() {
            let v = (ch as char).to_digit(16).unwrap_or(0);
            for bit in 0..4 {
                if v & (1 << bit) != 0 {
                    let core = nibble_idx * 4 + bit;
                    if core >= MAX_CORES {
                        return Err(CpuMaskError::TooLarge { mask: orig.to_string(), core, max: MAX_CORES - 1 });
                    }
                    cores.push(core);
                }
            }
        }
        Ok(Self { cores })
    }

    fn parse_list(orig: &str, inner: &str) -> Result<Self, CpuMaskError> {
        let mut cores = Vec::new();
        for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let syntax = || CpuMaskError::Syntax { mask: orig.to_string(), part: part.to_string() };
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => {
                    (a.trim().parse::<usize>().map_err(|_| syntax())?, b.trim().parse::<usize>().map_err(|_| syntax())?)
                }
                None => {
                    let c = part.parse::<usize>().map_err(|_| syntax())?;
                    (c, c)
                }
            };
            if hi < lo {
                return Err(CpuMaskError::Backwards { mask: orig.to_string(), part: part.to_string() });
            }
            if hi >= MAX_CORES {
                return Err(CpuMaskError::TooLarge { mask: orig.to_string(), core: hi, max: MAX_CORES - 1 });
            }
            cores.extend(lo..=hi);
        }
        cores.sort_unstable();
        cores.dedup();
        Ok(Self { cores })
    }

    /// A mask holding exactly these cores.
    pub fn from_cores(cores: impl IntoIterator<Item = usize>) -> Self {
        let mut cores: Vec<usize> = cores.into_iter().collect();
        cores.sort_unstable();
        cores.dedup();
        Self { cores }
    }

    /// The cores, ascending.
    pub fn cores(&self) -> &[usize] {
        &self.cores
    }

    /// Whether `core` is in the mask.
    pub fn contains(&self, core: usize) -> bool {
        self.cores.binary_search(&core).is_ok()
    }

    /// Number of cores in the mask.
    pub fn len(&self) -> usize {
        self.cores.len()
    }

    /// True when no core is set.
    pub fn is_empty(&self) -> bool {
        self.cores.is_empty()
    }

    /// The mask as SPDK prints it: lower-case hex with `0x`.
    pub fn to_hex(&self) -> String {
        let Some(&max) = self.cores.last() else {
            return "0x0".to_string();
        };
        let mut nibbles = vec![0u8; max / 4 + 1];
        for &c in &self.cores {
            nibbles[c / 4] |= 1 << (c % 4);
        }
        let digits: String = nibbles.iter().rev().map(|n| char::from_digit(u32::from(*n), 16).unwrap_or('0')).collect();
        let trimmed = digits.trim_start_matches('0');
        format!("0x{}", if trimmed.is_empty() { "0" } else { trimmed })
    }
}

impl fmt::Debug for CpuMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuMask({} = {:?})", self.to_hex(), self.cores)
    }
}

impl fmt::Display for CpuMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_masks_name_cores_by_bit() {
        assert_eq!(CpuMask::parse("0x3").unwrap().cores(), &[0, 1]);
        assert_eq!(CpuMask::parse("3").unwrap().cores(), &[0, 1]);
        assert_eq!(CpuMask::parse("0x10").unwrap().cores(), &[4]);
        assert_eq!(CpuMask::parse("0xA").unwrap().cores(), &[1, 3]);
    }

    #[test]
    fn core_lists_accept_brackets_ranges_and_commas() {
        assert_eq!(CpuMask::parse("[0,2-3]").unwrap().cores(), &[0, 2, 3]);
        assert_eq!(CpuMask::parse("0-1").unwrap().cores(), &[0, 1]);
        assert_eq!(CpuMask::parse("1,0,1").unwrap().cores(), &[0, 1]);
        assert_eq!(CpuMask::parse("[1]").unwrap().cores(), &[1]);
    }

    #[test]
    fn bad_masks_name_the_offending_part() {
        let e = CpuMask::parse("0xZZ").unwrap_err();
        assert!(e.to_string().contains("0xZZ"), "{e}");
        assert_eq!(CpuMask::parse("0x0").unwrap_err(), CpuMaskError::Empty("0x0".into()));
        assert!(matches!(CpuMask::parse("[3-1]").unwrap_err(), CpuMaskError::Backwards { .. }));
        assert!(matches!(CpuMask::parse("[0,x]").unwrap_err(), CpuMaskError::Syntax { .. }));
        assert!(matches!(CpuMask::parse("[5000]").unwrap_err(), CpuMaskError::TooLarge { core: 5000, .. }));
        assert!(matches!(CpuMask::parse("").unwrap_err(), CpuMaskError::Empty(_)));
    }

    #[test]
    fn hex_round_trips() {
        for s in ["0x1", "0x3", "0x10", "0xa5"] {
            assert_eq!(CpuMask::parse(s).unwrap().to_hex(), s);
        }
    }
}
