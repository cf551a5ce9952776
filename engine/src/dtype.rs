//! Element types. Kernels are written once, generic over [`Float`]; the only `match` on the dtype is in the
//! dispatch that picks `f::<f32>` or `f::<f64>`.

use std::fmt;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DType {
    F32,
    F64,
}

impl DType {
    pub fn size_in_bytes(&self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
        }
    }

    pub fn parse(s: &str) -> crate::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Ok(DType::F32),
            "f64" | "float64" | "double" => Ok(DType::F64),
            _ => Err(crate::Error::Msg { context: "dtype", msg: format!("unknown dtype '{s}', expected f32 or f64") }),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A floating-point element type: f32 or f64. Every CPU kernel is `fn f<T: Float>`.
pub trait Float:
    Copy
    + Send
    + Sync
    + 'static
    + Default
    + PartialOrd
    + PartialEq
    + fmt::Debug
    + fmt::Display
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + std::iter::Sum
{
    const DTYPE: DType;
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    const INFINITY: Self;

    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn ln_1p(self) -> Self;
    fn exp_m1(self) -> Self;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn tanh(self) -> Self;
    fn erf(self) -> Self;
    fn powf(self, p: Self) -> Self;
    fn sin(self) -> Self;
    fn cos(self) -> Self;
    fn is_nan(self) -> bool;
    fn max(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;

    /// Wraps a vector of this type into CPU storage.
    fn into_storage(v: Vec<Self>) -> crate::CpuStorage;
    /// The slice behind CPU storage of this dtype, if it is this dtype.
    fn slice(s: &crate::CpuStorage) -> Option<&[Self]>;
    fn slice_mut(s: &mut crate::CpuStorage) -> Option<&mut [Self]>;
    /// A cached buffer of exactly `n` elements, if the CPU pool holds one (see [`crate::storage::pool`]).
    fn take_pooled(n: usize) -> Option<Vec<Self>>;
}

macro_rules! impl_float {
    ($t:ty, $dtype:ident, $erf:path, $take:path) => {
        impl Float for $t {
            const DTYPE: DType = DType::$dtype;
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            const INFINITY: Self = <$t>::INFINITY;

            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn ln_1p(self) -> Self {
                <$t>::ln_1p(self)
            }
            #[inline(always)]
            fn exp_m1(self) -> Self {
                <$t>::exp_m1(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline(always)]
            fn erf(self) -> Self {
                $erf(self)
            }
            #[inline(always)]
            fn powf(self, p: Self) -> Self {
                <$t>::powf(self, p)
            }
            #[inline(always)]
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            #[inline(always)]
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            #[inline(always)]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
            #[inline(always)]
            fn min(self, o: Self) -> Self {
                <$t>::min(self, o)
            }
            fn into_storage(v: Vec<Self>) -> crate::CpuStorage {
                crate::CpuStorage::$dtype(v)
            }
            fn slice(s: &crate::CpuStorage) -> Option<&[Self]> {
                match s {
                    crate::CpuStorage::$dtype(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(s: &mut crate::CpuStorage) -> Option<&mut [Self]> {
                match s {
                    crate::CpuStorage::$dtype(v) => Some(v),
                    _ => None,
                }
            }
            fn take_pooled(n: usize) -> Option<Vec<Self>> {
                $take(n)
            }
        }
    };
}

impl_float!(f32, F32, libm::erff, crate::storage::take_f32);
impl_float!(f64, F64, libm::erf, crate::storage::take_f64);
