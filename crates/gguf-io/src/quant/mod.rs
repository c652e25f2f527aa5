//! Dequantization (placeholder; being written).
