//! MILA, MLLA and Mamba on mila-rs (issues 6 and 8).
//!
//! - [`LinearAttention`]: MILA's ELU+1 linear attention with RoPE-2D and LePE (`docs/MILA.md` section 2).
//! - [`MilaBlock`]: the MILA block, official `MLLABlock` (section 3).
//! - [`Mlla`]: the network with its [`Stem`], [`BasicLayer`] stages and [`PatchMerging`] (section 4), built
//!   from an [`MllaConfig`] (`tiny`, `small`, `base`, `mnist`).
//! - [`MambaMixer`]: the Mamba-1 mixer of `mamba_simple.py` over token sequences, with its [`CausalConv1d`]
//!   and the fused selective scan (section 6), built from a [`MambaConfig`].
//! - [`Ss2d`]: a vision Mamba block over token grids, VMamba's SS2D: a 3x3 depthwise conv, then the selective
//!   scan in four [`ScanOrder`]s (row- and column-major, both reversed) with their own parameters, summed.
//! - [`parity`]: the comparison against the PyTorch fixtures in `fixtures/`.
//! - [`ablation`]: the paper's ablation at small scale, a baseline linear attention network with each of
//!   Mamba's six designs switched on alone, and MILA ([`AblationNet`], [`Variant`]).
//!
//! Every module implements [`nn::Module`] under the official `state_dict` names and counts its
//! multiply-adds per sample with `macs()` (the mixer, which takes sequences of any length, per length).

pub mod ablation;
pub mod attention;
pub mod block;
pub mod mamba;
pub mod mlla;
pub mod parity;
pub mod ss2d;
mod util;

pub use ablation::{AblationConfig, AblationNet, Variant};
pub use attention::LinearAttention;
pub use block::{BlockConfig, MilaBlock};
pub use mamba::{CausalConv1d, MambaConfig, MambaMixer};
pub use mlla::{BasicLayer, ConvLayer, Mlla, MllaConfig, PatchMerging, Stem};
pub use ss2d::{ScanOrder, Ss2d};
