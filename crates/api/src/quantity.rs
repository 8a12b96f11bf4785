//! Resource quantities as operators write them: CPU as `500m` or `2`, memory and disk
//! as `64Mi`, `1Gi`, `500M` or plain bytes.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// CPU in millicores (`1` CPU = `1000m`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cpu(pub u64);

/// A size in bytes (memory, disk).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes(pub u64);

impl Cpu {
    /// Parse `500m`, `2`, `0.5`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("'{s}' is not a CPU quantity; use millicores like 500m or cores like 2 or 0.5")
        };
        let s = s.trim();
        if let Some(m) = s.strip_suffix('m') {
            return m.parse::<u64>().map(Cpu).map_err(|_| bad());
        }
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        if whole.is_empty() && frac.is_empty() || frac.len() > 3 {
            return Err(bad());
        }
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad())?
        };
        let frac_m: u64 = if frac.is_empty() {
            0
        } else {
            let n: u64 = frac.parse().map_err(|_| bad())?;
            n * 10u64.pow(3 - frac.len() as u32)
        };
        whole
            .checked_mul(1000)
            .and_then(|w| w.checked_add(frac_m))
            .map(Cpu)
            .ok_or_else(bad)
    }
}

impl fmt::Display for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1000) {
            write!(f, "{}", self.0 / 1000)
        } else {
            write!(f, "{}m", self.0)
        }
    }
}

const UNITS: &[(&str, u64)] = &[
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("Pi", 1 << 50),
    ("k", 1_000),
    ("K", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
];

impl Bytes {
    /// Parse `64Mi`, `1Gi`, `500M`, `1024`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a size; use e.g. 64Mi, 1Gi or a number of bytes");
        let s = s.trim();
        let (num, mult) = UNITS
            .iter()
            .find_map(|(suffix, mult)| s.strip_suffix(suffix).map(|n| (n, *mult)))
            .unwrap_or((s, 1));
        let n: u64 = num.parse().map_err(|_| bad())?;
        n.checked_mul(mult).map(Bytes).ok_or_else(bad)
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (suffix, mult) in [
            ("Ti", 1u64 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ] {
            if self.0 >= mult && self.0.is_multiple_of(mult) {
                return write!(f, "{}{suffix}", self.0 / mult);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Bytes {
    /// A short human form for tables, rounded (e.g. `1.5Gi`).
    pub fn human(&self) -> String {
        for (suffix, mult) in [
            ("Ti", 1u64 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ] {
            if self.0 >= mult {
                let v = self.0 as f64 / mult as f64;
                return if v >= 10.0 || self.0.is_multiple_of(mult) {
                    format!("{:.0}{suffix}", v)
                } else {
                    format!("{:.1}{suffix}", v)
                };
            }
        }
        format!("{}", self.0)
    }
}

macro_rules! string_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                // Accept both "2" and 2 (YAML and JSON users write either).
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum Raw {
                    S(String),
                    U(u64),
                    F(f64),
                }
                let raw = Raw::deserialize(d)?;
                let text = match raw {
                    Raw::S(s) => s,
                    Raw::U(u) => u.to_string(),
                    Raw::F(f) => f.to_string(),
                };
                <$t>::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}
string_serde!(Cpu);
string_serde!(Bytes);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cpu_forms() {
        assert_eq!(Cpu::parse("500m"), Ok(Cpu(500)));
        assert_eq!(Cpu::parse("2"), Ok(Cpu(2000)));
        assert_eq!(Cpu::parse("0.25"), Ok(Cpu(250)));
        assert!(Cpu::parse("lots").unwrap_err().contains("500m"));
        assert!(Cpu::parse("0.0001").is_err());
        assert_eq!(Cpu(1500).to_string(), "1500m");
        assert_eq!(Cpu(2000).to_string(), "2");
    }

    #[test]
    fn byte_forms() {
        assert_eq!(Bytes::parse("64Mi"), Ok(Bytes(64 << 20)));
        assert_eq!(Bytes::parse("1Gi"), Ok(Bytes(1 << 30)));
        assert_eq!(Bytes::parse("500M"), Ok(Bytes(500_000_000)));
        assert_eq!(Bytes::parse("100"), Ok(Bytes(100)));
        assert!(Bytes::parse("64Q").unwrap_err().contains("64Mi"));
        assert_eq!(Bytes(64 << 20).to_string(), "64Mi");
    }

    proptest! {
        #[test]
        fn display_round_trips(c in 0u64..10_000_000, b in 0u64..(1u64 << 50)) {
            prop_assert_eq!(Cpu::parse(&Cpu(c).to_string()), Ok(Cpu(c)));
            prop_assert_eq!(Bytes::parse(&Bytes(b).to_string()), Ok(Bytes(b)));
        }
    }
}
