//! Write → read round trips, hostile headers, and the truncation / bit-flip sweep.

use gguf_io::{
    Array, ByteOrder, GgmlType, GgufError, GgufFile, GgufWriter, HeaderSpec, Metadata,
    StreamReader, TensorSpec, Value,
};

/// Metadata exercising every value type, arrays of every type, strings, nesting.
fn every_value() -> Metadata {
    let mut m = Metadata::new();
    m.set("general.architecture", "llama");
    m.set("t.u8", 200u8);
    m.set("t.i8", -5i8);
    m.set("t.u16", 65000u16);
    m.set("t.i16", -32000i16);
    m.set("t.u32", 4_000_000_000u32);
    m.set("t.i32", -2_000_000_000i32);
    m.set("t.f32", 1.5f32);
    m.set("t.bool", true);
    m.set("t.string", "héllo\0world");
    m.set("t.u64", u64::MAX);
    m.set("t.i64", i64::MIN);
    m.set("t.f64", -0.1f64);
    m.set("a.u8", vec![1u8, 2, 3]);
    m.set("a.i8", vec![-1i8, 2]);
    m.set("a.u16", vec![1u16]);
    m.set("a.i16", vec![-1i16, 7]);
    m.set("a.u32", vec![1u32, 2]);
    m.set("a.i32", vec![-1i32]);
    m.set("a.f32", vec![f32::NAN, f32::INFINITY, -0.0]);
    m.set("a.bool", vec![true, false]);
    m.set(
        "a.string",
        vec!["a".to_owned(), String::new(), "ü".to_owned()],
    );
    m.set("a.u64", vec![u64::MAX]);
    m.set("a.i64", vec![i64::MIN, 0]);
    m.set("a.f64", vec![1e300f64]);
    m.set("a.empty", Vec::<u32>::new());
    m.set(
        "a.nested",
        Array::Array(vec![
            Array::U8(vec![1, 2]),
            Array::String(vec!["x".into()]),
            Array::Array(vec![Array::F64(vec![2.5])]),
        ]),
    );
    m
}

fn sample_spec(order: ByteOrder) -> (HeaderSpec, Vec<Vec<u8>>) {
    let tensors = vec![
        TensorSpec {
            name: "a".into(),
            dims: vec![3],
            ty: GgmlType::F32,
        },
        TensorSpec {
            name: "blk.0.q".into(),
            dims: vec![64, 2],
            ty: GgmlType::Q4_0,
        },
        TensorSpec {
            name: "c".into(),
            dims: vec![5, 1, 1, 2],
            ty: GgmlType::F16,
        },
    ];
    let data = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let n = t.ty.bytes_for(t.dims.iter().product()).unwrap() as usize;
            (0..n).map(|j| (i * 31 + j * 7) as u8).collect()
        })
        .collect();
    (
        HeaderSpec {
            metadata: every_value(),
            tensors,
            byte_order: order,
        },
        data,
    )
}

fn write_to_vec(spec: &HeaderSpec, data: &[Vec<u8>]) -> Vec<u8> {
    let mut w = GgufWriter::new(Vec::new(), spec).unwrap();
    for d in data {
        w.write_tensor(d).unwrap();
    }
    w.finish().unwrap()
}

fn sample_file() -> Vec<u8> {
    let (spec, data) = sample_spec(ByteOrder::Little);
    write_to_vec(&spec, &data)
}

#[test]
fn round_trip_both_byte_orders() {
    for order in [ByteOrder::Little, ByteOrder::Big] {
        let (spec, data) = sample_spec(order);
        let bytes = write_to_vec(&spec, &data);
        let f = GgufFile::from_bytes(bytes.clone()).unwrap();
        let h = f.header();
        assert_eq!(h.version, 3);
        assert_eq!(h.byte_order, order);
        assert_eq!(h.alignment, 32);
        assert_eq!(h.data_offset % 32, 0);
        // Values (NaN compared by bits through Debug) and key order are identical.
        assert_eq!(format!("{:?}", h.metadata), format!("{:?}", spec.metadata));
        let keys: Vec<&str> = h.metadata.iter().map(|(k, _)| k).collect();
        let want: Vec<&str> = spec.metadata.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, want);
        for (t, (s, d)) in f.tensors().iter().zip(spec.tensors.iter().zip(&data)) {
            assert_eq!((&t.name, &t.dims, t.ty), (&s.name, &s.dims, s.ty));
            assert_eq!(t.offset % 32, 0);
            assert_eq!(f.tensor_data(t), &d[..]);
        }
        // Re-writing what was read gives the same bytes.
        let again = write_to_vec(&HeaderSpec::from_header(h), &data);
        assert_eq!(again, bytes);
    }
}

#[test]
fn stream_reader_matches_file_reader() {
    let bytes = sample_file();
    let f = GgufFile::from_bytes(bytes.clone()).unwrap();
    let mut s = StreamReader::new(&bytes[..]).unwrap();
    assert_eq!(format!("{:?}", s.header()), format!("{:?}", f.header()));
    let mut seen = 0;
    while let Some((t, data)) = s.next_tensor().unwrap() {
        assert_eq!(data, f.tensor_data(f.tensor(&t.name).unwrap()));
        seen += 1;
    }
    assert_eq!(seen, 3);
}

#[test]
fn custom_alignment_is_honoured() {
    let (mut spec, data) = sample_spec(ByteOrder::Little);
    spec.metadata.set("general.alignment", 64u32);
    let f = GgufFile::from_bytes(write_to_vec(&spec, &data)).unwrap();
    assert_eq!(f.header().alignment, 64);
    assert!(f.tensors().iter().all(|t| t.offset % 64 == 0));
    assert_eq!(f.header().data_offset % 64, 0);
    spec.metadata.set("general.alignment", 48u32);
    assert!(matches!(
        GgufWriter::new(Vec::new(), &spec),
        Err(GgufError::BadAlignment { .. })
    ));
}

#[test]
fn writer_rejects_bad_specs_and_sizes() {
    let long = TensorSpec {
        name: "x".repeat(64),
        dims: vec![1],
        ty: GgmlType::F32,
    };
    let spec = HeaderSpec {
        tensors: vec![long],
        ..Default::default()
    };
    assert!(matches!(
        GgufWriter::new(Vec::new(), &spec),
        Err(GgufError::NameTooLong { len: 64, .. })
    ));
    let (spec, data) = sample_spec(ByteOrder::Little);
    let mut w = GgufWriter::new(Vec::new(), &spec).unwrap();
    assert!(matches!(
        w.write_tensor(&data[0][1..]),
        Err(GgufError::DataSizeMismatch { .. })
    ));
    let w = GgufWriter::new(Vec::new(), &spec).unwrap();
    assert!(matches!(w.finish(), Err(GgufError::WriterState(_))));
}

#[test]
fn atomic_write_leaves_old_file_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    let (spec, data) = sample_spec(ByteOrder::Little);
    gguf_io::write_file(&path, &spec, |w| {
        for d in &data {
            w.write_tensor(d)?;
        }
        Ok(())
    })
    .unwrap();
    let before = std::fs::read(&path).unwrap();
    // A failing second write (too little data) must not touch the first file.
    let r = gguf_io::write_file(&path, &spec, |w| w.write_tensor(&data[0]));
    assert!(r.is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    assert_eq!(GgufFile::open(&path).unwrap().tensors().len(), 3);
}

fn header_only(n_tensors: u64, n_kv: u64, rest: &[u8]) -> Vec<u8> {
    let mut v = b"GGUF".to_vec();
    v.extend_from_slice(&3u32.to_le_bytes());
    v.extend_from_slice(&n_tensors.to_le_bytes());
    v.extend_from_slice(&n_kv.to_le_bytes());
    v.extend_from_slice(rest);
    v
}

#[test]
fn hostile_counts_fail_fast_without_allocating() {
    // 2^60 keys.
    let e = GgufFile::from_bytes(header_only(0, 1 << 60, &[])).unwrap_err();
    assert!(
        matches!(e, GgufError::CountTooLarge { count, offset: 16, .. } if count == 1 << 60),
        "{e}"
    );
    // 2^60 tensors, on a stream too (no known length).
    let bytes = header_only(1 << 60, 0, &[]);
    let e = StreamReader::new(&bytes[..]).err().unwrap();
    assert!(matches!(e, GgufError::CountTooLarge { .. }), "{e}");
    // A 2^40-byte key string.
    let mut huge = (1u64 << 40).to_le_bytes().to_vec();
    huge.extend_from_slice(&[0; 16]);
    let e = GgufFile::from_bytes(header_only(0, 1, &huge)).unwrap_err();
    assert!(
        matches!(e, GgufError::StringTooLong { offset: 24, .. }),
        "{e}"
    );
    // On a stream (no known length) a 512 MiB string followed by end of input fails
    // without first reserving 512 MiB.
    let mut claim = (1u64 << 29).to_le_bytes().to_vec();
    claim.extend_from_slice(b"abc");
    let bytes = header_only(0, 1, &claim);
    let e = StreamReader::new(&bytes[..]).err().unwrap();
    assert!(
        matches!(e, GgufError::Truncated { end, .. } if end == bytes.len() as u64),
        "{e}"
    );
    // An array claiming 2^50 u32 elements.
    let mut kv = Vec::new();
    kv.extend_from_slice(&1u64.to_le_bytes());
    kv.push(b'k');
    kv.extend_from_slice(&9u32.to_le_bytes());
    kv.extend_from_slice(&4u32.to_le_bytes());
    kv.extend_from_slice(&(1u64 << 50).to_le_bytes());
    let e = GgufFile::from_bytes(header_only(0, 1, &kv)).unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::CountTooLarge {
                what: "array element",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn versions_and_magic() {
    let mut v1 = sample_file();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(v1).unwrap_err(),
        GgufError::UnsupportedVersion { version: 1 }
    ));
    let mut v2 = sample_file();
    v2[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(GgufFile::from_bytes(v2).unwrap().header().version, 2);
    let mut bad = sample_file();
    bad[0] = b'X';
    assert!(matches!(
        GgufFile::from_bytes(bad).unwrap_err(),
        GgufError::BadMagic { .. }
    ));
}

#[test]
fn tensor_table_defects_are_typed() {
    // A file with no metadata and one hand-built tensor info, varied field by field.
    let mut ti = Vec::new();
    ti.extend_from_slice(&1u64.to_le_bytes());
    ti.push(b't');
    ti.extend_from_slice(&2u32.to_le_bytes());
    ti.extend_from_slice(&u64::MAX.to_le_bytes()); // dim 0 too large
    ti.extend_from_slice(&1u64.to_le_bytes());
    ti.extend_from_slice(&0u32.to_le_bytes());
    ti.extend_from_slice(&0u64.to_le_bytes());
    let e = GgufFile::from_bytes(header_only(1, 0, &ti)).unwrap_err();
    assert!(matches!(e, GgufError::BadDim { dim: 0, .. }), "{e}");
    // Two dims whose product overflows.
    let mut ti2 = ti.clone();
    ti2[13..21].copy_from_slice(&(1u64 << 40).to_le_bytes());
    ti2[21..29].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = GgufFile::from_bytes(header_only(1, 0, &ti2)).unwrap_err();
    assert!(matches!(e, GgufError::SizeOverflow { .. }), "{e}");
    // Retired type q4_2.
    let mut ti3 = ti.clone();
    ti3[13..21].copy_from_slice(&32u64.to_le_bytes());
    ti3[29..33].copy_from_slice(&4u32.to_le_bytes());
    let e = GgufFile::from_bytes(header_only(1, 0, &ti3)).unwrap_err();
    assert!(matches!(e, GgufError::UnknownType { ty: 4, .. }), "{e}");
    // Valid shape but data past the end of the file.
    let mut ti4 = ti.clone();
    ti4[13..21].copy_from_slice(&8u64.to_le_bytes());
    let e = GgufFile::from_bytes(header_only(1, 0, &ti4)).unwrap_err();
    assert!(matches!(e, GgufError::DataOutOfBounds { .. }), "{e}");
}

/// Every prefix of a valid file is an error (never a panic); every single-byte flip in the
/// header is either an error or a file that still reads consistently.
#[test]
fn truncation_and_bit_flips_never_panic() {
    let bytes = sample_file();
    let full = GgufFile::from_bytes(bytes.clone()).unwrap();
    let data_end = (full.header().data_offset + full.header().data_len()) as usize;
    for cut in 0..data_end {
        let r = GgufFile::from_bytes(bytes[..cut].to_vec());
        assert!(r.is_err(), "prefix of {cut} bytes was accepted");
        let mut s = match StreamReader::new(&bytes[..cut]) {
            Ok(s) => s,
            Err(_) => continue,
        };
        let mut failed = false;
        loop {
            match s.next_tensor() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed, "stream prefix of {cut} bytes was read to the end");
    }
    let header_len = full.header().header_len as usize;
    for pos in 0..header_len {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[pos] ^= 1 << bit;
            if let Ok(f) = GgufFile::from_bytes(b) {
                for t in f.tensors() {
                    assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes);
                }
            }
        }
    }
}

#[test]
fn values_convert() {
    assert_eq!(Value::U8(3).as_u64(), Some(3));
    assert_eq!(Value::I32(-3).as_u64(), None);
    assert_eq!(Value::I32(-3).as_i64(), Some(-3));
    assert_eq!(Value::F32(0.5).as_f64(), Some(0.5));
    assert_eq!(Value::String("x".into()).as_str(), Some("x"));
}

/// Inputs the fuzzer (fuzz/, `cargo fuzz run parse`) once broke the reader with: each
/// must now read, or fail with an error, through both readers without a panic.
#[test]
fn fuzz_regressions() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz-regressions");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let _ = GgufFile::from_bytes(bytes.clone());
        if let Ok(mut s) = StreamReader::new(&bytes[..]) {
            while let Ok(Some(_)) = s.next_tensor() {}
        }
        n += 1;
    }
    assert!(n >= 2);
}

/// `release_pages` drops the mapped pages from the resident set; reads after it see the
/// file's same bytes (and it is a no-op for a file in memory).
#[test]
fn released_pages_read_back_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    std::fs::write(&path, sample_file()).unwrap();
    let (_, data) = sample_spec(ByteOrder::Little);
    for f in [
        GgufFile::open(&path).unwrap(),
        GgufFile::from_bytes(sample_file()).unwrap(),
    ] {
        for _ in 0..2 {
            for (t, d) in f.tensors().iter().zip(&data) {
                assert_eq!(f.tensor_data(t), &d[..]);
            }
            f.release_pages();
        }
    }
}
