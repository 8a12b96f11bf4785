//! Compressed chunks of `(time, value)` samples, after Facebook's Gorilla (Pelkonen
//! et al., VLDB 2015), which Prometheus's chunks follow too: times as
//! delta-of-deltas in a few bits (a regular 10 s interval with a few milliseconds of
//! jitter costs 9 bits), values as the XOR with the previous value (an unchanged
//! value costs one bit; a slowly changing one, its changed bits). A series keeps
//! closed chunks as bytes and appends to its open one.

/// Writes bits, most significant first.
#[derive(Debug, Clone, Default)]
struct BitWriter {
    buf: Vec<u8>,
    /// Bits used in the last byte (0 = the last byte is full or there is none).
    used: u8,
}

impl BitWriter {
    fn write(&mut self, value: u64, bits: u32) {
        for i in (0..bits).rev() {
            if self.used == 0 {
                self.buf.push(0);
            }
            let bit = ((value >> i) & 1) as u8;
            if let Some(last) = self.buf.last_mut() {
                *last |= bit << (7 - self.used);
            }
            self.used = (self.used + 1) % 8;
        }
    }
}

struct BitReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl BitReader<'_> {
    fn read(&mut self, bits: u32) -> Option<u64> {
        let mut v = 0u64;
        for _ in 0..bits {
            let byte = *self.buf.get(self.pos / 8)?;
            let bit = (byte >> (7 - (self.pos % 8))) & 1;
            v = (v << 1) | u64::from(bit);
            self.pos += 1;
        }
        Some(v)
    }

    fn bit(&mut self) -> Option<bool> {
        self.read(1).map(|b| b == 1)
    }
}

/// Delta-of-delta buckets: `(prefix, prefix bits, value bits)`.
const BUCKETS: [(u64, u32, u32); 3] = [(0b10, 2, 7), (0b110, 3, 9), (0b1110, 4, 12)];

fn fits(v: i64, bits: u32) -> bool {
    let half = 1i64 << (bits - 1);
    (-half + 1..=half).contains(&v)
}

/// A chunk being written.
#[derive(Debug, Clone, Default)]
pub struct Chunk {
    w: BitWriter,
    count: u32,
    first_t: i64,
    last_t: i64,
    delta: i64,
    last_v: u64,
    leading: u32,
    trailing: u32,
}

impl Chunk {
    /// Samples in the chunk.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The first sample's time.
    pub fn first_t(&self) -> i64 {
        self.first_t
    }

    /// The last sample's time.
    pub fn last_t(&self) -> i64 {
        self.last_t
    }

    /// Bytes the chunk's samples take.
    pub fn bytes(&self) -> usize {
        self.w.buf.len()
    }

    /// Give back memory the writer reserved beyond what it holds (a closed chunk).
    pub fn shrink(&mut self) {
        self.w.buf.shrink_to_fit();
    }

    /// Append a sample (its time after the last one's).
    pub fn push(&mut self, t: i64, v: f64) {
        let bits = v.to_bits();
        if self.count == 0 {
            self.w.write(t as u64, 64);
            self.w.write(bits, 64);
            self.first_t = t;
        } else {
            let delta = t - self.last_t;
            let dod = delta - self.delta;
            self.delta = delta;
            if dod == 0 {
                self.w.write(0, 1);
            } else if let Some((prefix, pbits, vbits)) =
                BUCKETS.iter().find(|(_, _, vb)| fits(dod, *vb))
            {
                self.w.write(*prefix, *pbits);
                self.w.write((dod as u64) & ((1 << vbits) - 1), *vbits);
            } else {
                self.w.write(0b1111, 4);
                self.w.write(dod as u64, 64);
            }
            let xor = bits ^ self.last_v;
            if xor == 0 {
                self.w.write(0, 1);
            } else {
                self.w.write(1, 1);
                let leading = xor.leading_zeros().min(31);
                let trailing = xor.trailing_zeros();
                if self.count > 1 && leading >= self.leading && trailing >= self.trailing {
                    self.w.write(0, 1);
                    let len = 64 - self.leading - self.trailing;
                    self.w.write(xor >> self.trailing, len);
                } else {
                    self.w.write(1, 1);
                    let len = 64 - leading - trailing;
                    self.w.write(u64::from(leading), 5);
                    self.w.write(u64::from(len - 1), 6);
                    self.w.write(xor >> trailing, len);
                    self.leading = leading;
                    self.trailing = trailing;
                }
            }
        }
        self.last_t = t;
        self.last_v = bits;
        self.count += 1;
    }

    /// The chunk's samples, in order.
    pub fn samples(&self) -> Vec<(i64, f64)> {
        let mut out = Vec::with_capacity(self.count as usize);
        let mut r = BitReader {
            buf: &self.w.buf,
            pos: 0,
        };
        let (mut t, mut delta, mut v) = (0i64, 0i64, 0u64);
        let (mut leading, mut trailing) = (0u32, 0u32);
        for i in 0..self.count {
            if i == 0 {
                let (Some(t0), Some(v0)) = (r.read(64), r.read(64)) else {
                    break;
                };
                t = t0 as i64;
                v = v0;
            } else {
                let mut dod = 0i64;
                if r.bit() == Some(true) {
                    let mut found = false;
                    // Each bucket's prefix is one more 1 than the last: a 0 ends it.
                    for (_, _, vbits) in BUCKETS {
                        if r.bit() == Some(false) {
                            let raw = r.read(vbits).unwrap_or(0);
                            // Sign-extend from vbits.
                            dod = ((raw << (64 - vbits)) as i64) >> (64 - vbits);
                            found = true;
                            break;
                        }
                    }
                    if !found {
                        dod = r.read(64).unwrap_or(0) as i64;
                    }
                }
                delta += dod;
                t += delta;
                if r.bit() == Some(true) {
                    if r.bit() == Some(true) {
                        leading = r.read(5).unwrap_or(0) as u32;
                        let len = r.read(6).unwrap_or(0) as u32 + 1;
                        trailing = 64 - leading - len;
                    }
                    let len = 64 - leading - trailing;
                    v ^= r.read(len).unwrap_or(0) << trailing;
                }
            }
            out.push((t, f64::from_bits(v)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_regular_gauge_costs_about_a_byte_and_a_half_a_sample() {
        let mut c = Chunk::default();
        let mut want = Vec::new();
        for i in 0..120i64 {
            // 10 s apart with jitter; memory in whole MiB that moves now and then.
            let t = 1_733_000_000_000 + i * 10_000 + (i * 7 % 13);
            let v = f64::from(((512 + (i / 10) % 3) as i32) << 20);
            c.push(t, v);
            want.push((t, v));
        }
        assert_eq!(c.samples(), want);
        let per = c.bytes() as f64 / 120.0;
        assert!(per < 2.5, "{per} bytes a sample");
    }

    proptest! {
        #[test]
        fn samples_round_trip(
            steps in proptest::collection::vec((1i64..100_000_000, any::<f64>().prop_filter("finite", |v| v.is_finite())), 1..200),
        ) {
            let mut c = Chunk::default();
            let mut t = 1_700_000_000_000i64;
            let mut want = Vec::new();
            for (dt, v) in steps {
                t += dt;
                c.push(t, v);
                want.push((t, v));
            }
            let got = c.samples();
            prop_assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                prop_assert_eq!(g.0, w.0);
                prop_assert_eq!(g.1.to_bits(), w.1.to_bits());
            }
        }
    }
}
