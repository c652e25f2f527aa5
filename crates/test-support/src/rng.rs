//! One seeded generator for test data: xorshift64* (Vigna 2016), small, fast and
//! reproducible across platforms. Not for anything that needs real randomness.

/// xorshift64*. The seed must not be 0 (0 is replaced by a fixed non-zero value).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n` > 0; the modulo bias is irrelevant for tests).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// `n` bytes, each from the high half of one draw.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next_u64() >> 32) as u8).collect()
    }

    /// Uniform in [0, 1), 24 bits.
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [-1, 1).
    pub fn signed(&mut self) -> f32 {
        self.unit() * 2.0 - 1.0
    }

    /// Roughly normal (Irwin-Hall with 4 terms): mean 0, sd 1.
    pub fn normal(&mut self) -> f32 {
        let s: f32 = (0..4).map(|_| self.unit()).sum();
        (s - 2.0) * 3f32.sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first outputs of xorshift64* for seed 1, computed by hand from the
    /// definition in u128 arithmetic (the multiply is mod 2^64).
    #[test]
    fn matches_the_definition() {
        let mut x: u64 = 1;
        let mut reference = Vec::new();
        for _ in 0..4 {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            reference.push(((x as u128 * 0x2545_f491_4f6c_dd1d_u128) % (1u128 << 64)) as u64);
        }
        let mut r = Rng::new(1);
        let ours: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        assert_eq!(ours, reference);
        assert_eq!(ours[0], 5_180_492_295_206_395_165);
    }

    #[test]
    fn ranges_hold() {
        let mut r = Rng::new(7);
        for _ in 0..10_000 {
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
            let s = r.signed();
            assert!((-1.0..1.0).contains(&s));
            assert!(r.below(10) < 10);
        }
        let n: Vec<f32> = (0..20_000).map(|_| r.normal()).collect();
        let mean = n.iter().map(|&x| x as f64).sum::<f64>() / n.len() as f64;
        let var = n.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n.len() as f64;
        assert!(mean.abs() < 0.03, "{mean}");
        assert!((var - 1.0).abs() < 0.05, "{var}");
        assert_ne!(Rng::new(0).next_u64(), 0);
    }
}
