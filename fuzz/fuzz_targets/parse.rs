//! Fuzz the GGUF parser: random bytes through the file reader and the stream reader.
//! Whatever parses must give in-bounds tensor data, dequantize without panicking, agree
//! between the two readers, and survive a write/read round trip.
#![no_main]

use gguf_io::{GgufFile, GgufWriter, HeaderSpec, StreamReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let file = GgufFile::from_bytes(data.to_vec());
    let mut stream = StreamReader::new(data);
    let Ok(file) = file else {
        return;
    };
    let stream = stream.as_mut().expect("a file that parses also parses as a stream");
    while let Ok(Some((t, bytes))) = stream.next_tensor() {
        let info = file.tensor(&t.name).expect("same tensor table");
        assert_eq!(file.tensor_data(info), &bytes[..]);
    }
    for t in file.tensors() {
        assert_eq!(file.tensor_data(t).len() as u64, t.n_bytes);
        if t.n_elements <= 1 << 16 {
            let _ = file.tensor_f32(t);
        }
    }
    // Round trip: what we read, we can write, and read back the same.
    let spec = HeaderSpec::from_header(file.header());
    if let Ok(mut w) = GgufWriter::new(Vec::new(), &spec) {
        for t in file.tensors() {
            w.write_tensor(file.tensor_data(t)).expect("sizes match");
        }
        let bytes = w.finish().expect("all tensors written");
        let again = GgufFile::from_bytes(bytes).expect("our own output parses");
        assert_eq!(again.tensors().len(), file.tensors().len());
        assert_eq!(again.metadata().len(), file.metadata().len());
    }
});
