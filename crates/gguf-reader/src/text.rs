//! Human-readable rendering of a [`Report`].

use std::io::{self, Write};

use gguf_io::{Array, Value};

use crate::args::Options;
use crate::report::{Kind, Report, ARRAY_PREVIEW};
use tensor_stats::sci;
use trace_format::escape;

pub fn render(r: &Report, opts: &Options, out: &mut impl Write) -> io::Result<()> {
    let h = &r.header;
    writeln!(out, "GGUF: {}", escape(&r.input))?;
    if r.kind == Kind::KqvTrace {
        writeln!(out, "  kind:         kv-cache-monitor trace")?;
    }
    writeln!(out, "  version:      {}", h.version)?;
    writeln!(out, "  byte order:   {}", h.byte_order.name())?;
    writeln!(out, "  alignment:    {}", h.alignment)?;
    writeln!(out, "  data offset:  {}", h.data_offset)?;
    if let Some(size) = r.file_size {
        writeln!(out, "  file size:    {size}")?;
    }
    writeln!(out, "  metadata:     {} keys", h.metadata.len())?;
    writeln!(out, "  tensors:      {}", h.tensors.len())?;

    writeln!(out, "\nMetadata ({} keys):", h.metadata.len())?;
    let key_w = h
        .metadata
        .iter()
        .map(|(k, _)| escape(k).len())
        .max()
        .unwrap_or(0);
    for (k, v) in h.metadata.iter() {
        let k = escape(k);
        let ty = match v {
            Value::Array(a) => format!("ARRAY[{}; {}]", a.elem_type().name(), a.len()),
            v => v.value_type().name().to_owned(),
        };
        let limit = if opts.full_arrays {
            usize::MAX
        } else {
            ARRAY_PREVIEW
        };
        writeln!(out, "  {k:<key_w$}  {ty:<8}  {}", value_text(v, limit))?;
    }

    let sel = &r.selected;
    if opts.tensor_filter.is_some() {
        writeln!(
            out,
            "\nTensors ({} of {} match):",
            sel.len(),
            h.tensors.len()
        )?;
    } else {
        writeln!(out, "\nTensors ({}):", h.tensors.len())?;
    }
    let rows: Vec<Vec<String>> = sel
        .iter()
        .map(|&i| {
            let t = &h.tensors[i];
            let mut row = vec![
                i.to_string(),
                escape(&t.name).into_owned(),
                t.ty.name().to_owned(),
                shape_text(&t.dims),
                t.n_elements.to_string(),
                t.n_bytes.to_string(),
                t.offset.to_string(),
            ];
            // A version-2 trace: how the tensor is stored (its type and shape above are
            // the GGUF tensor's: a delta's changed bytes).
            if let Some(s) = r.stored.as_ref().and_then(|s| s.get(i)) {
                row.push(s.clone());
            }
            row
        })
        .collect();
    let mut head: Vec<String> = ["#", "name", "type", "shape", "elements", "bytes", "offset"]
        .map(str::to_owned)
        .to_vec();
    if r.stored.is_some() {
        head.push("stored".to_owned());
    }
    let mut w: Vec<usize> = head.iter().map(String::len).collect();
    for row in &rows {
        for (c, cell) in row.iter().enumerate() {
            w[c] = w[c].max(cell.len());
        }
    }
    write_row(out, &head, &w)?;
    for row in &rows {
        write_row(out, row, &w)?;
    }

    if let Some(g) = &r.trace {
        writeln!(out, "\nTrace steps ({}):", g.steps.len())?;
        for (step, idx) in &g.steps {
            writeln!(out, "  step {step}: {} tensors", idx.len())?;
        }
        if !g.ungrouped.is_empty() {
            writeln!(out, "  without a step: {} tensors", g.ungrouped.len())?;
        }
    }

    if opts.show_data {
        writeln!(
            out,
            "\nData (first {} values, statistics over all):",
            opts.count
        )?;
        for &i in sel {
            // A version-2 trace's tensor as its logical data is (a delta rebuilt).
            let (ty, dims) = r.data_layout(i);
            writeln!(
                out,
                "  {} [{} {}]",
                escape(&h.tensors[i].name),
                ty.name(),
                shape_text(dims)
            )?;
            match r.data.get(&i) {
                Some(Ok(d)) => {
                    let first: Vec<String> = d.first.iter().map(|x| format!("{x:.6}")).collect();
                    writeln!(out, "    values: [{}]", first.join(", "))?;
                    let s = &d.summary;
                    writeln!(
                        out,
                        "    mean={} std={} min={} max={} nan={} inf={}",
                        sci(s.mean),
                        sci(s.std),
                        sci(s.min),
                        sci(s.max),
                        s.nan,
                        s.inf()
                    )?;
                }
                Some(Err(e)) => writeln!(out, "    no data: {}", escape(e))?,
                None => writeln!(out, "    no data")?,
            }
        }
    }
    Ok(())
}

/// One table row: `#` and the numbers right-aligned, names left-aligned.
fn write_row(out: &mut impl Write, cells: &[String], w: &[usize]) -> io::Result<()> {
    for (c, cell) in cells.iter().enumerate() {
        let width = w[c];
        if c == 7 {
            // The last column, left-aligned: no trailing blanks.
            write!(out, "  {cell}")?;
        } else if matches!(c, 1..=3) {
            write!(out, "  {cell:<width$}")?;
        } else {
            write!(out, "  {cell:>width$}")?;
        }
    }
    writeln!(out)
}

pub fn shape_text(dims: &[u64]) -> String {
    let d: Vec<String> = dims.iter().map(u64::to_string).collect();
    format!("[{}]", d.join(", "))
}

fn value_text(v: &Value, limit: usize) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => array_text(a, limit),
        Value::F32(x) => format!("{x:?}"),
        Value::F64(x) => format!("{x:?}"),
        Value::U8(x) => x.to_string(),
        Value::I8(x) => x.to_string(),
        Value::U16(x) => x.to_string(),
        Value::I16(x) => x.to_string(),
        Value::U32(x) => x.to_string(),
        Value::I32(x) => x.to_string(),
        Value::U64(x) => x.to_string(),
        Value::I64(x) => x.to_string(),
        Value::Bool(x) => x.to_string(),
    }
}

fn array_text(a: &Array, limit: usize) -> String {
    let n = a.len().min(limit);
    let items: Vec<String> = (0..n)
        .filter_map(|i| a.get(i))
        .map(|v| value_text(&v, limit))
        .collect();
    if a.len() > n {
        format!("[{}, ...] ({} entries)", items.join(", "), a.len())
    } else {
        format!("[{}]", items.join(", "))
    }
}
