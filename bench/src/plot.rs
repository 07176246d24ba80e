//! A PNG of latency distributions: percentile (in "nines") against latency (log scale), one curve
//! per series. Drawn directly (png + an 8×8 bitmap font) to keep the bench free of a plotting stack.

use std::path::Path;

use hdrhistogram::Histogram;

const W: usize = 960;
const H: usize = 600;
const LEFT: usize = 80;
const RIGHT: usize = 260;
const TOP: usize = 50;
const BOTTOM: usize = 60;
const COLORS: [[u8; 3]; 6] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [148, 103, 189],
    [255, 127, 14],
    [23, 190, 207],
];

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self {
            px: vec![255; W * H * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], width: i64) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()) as i64).max(1);
        for s in 0..=steps {
            let t = s as f64 / steps as f64;
            let (x, y) = (
                (x0 + (x1 - x0) * t).round() as i64,
                (y0 + (y1 - y0) * t).round() as i64,
            );
            for dx in 0..width {
                for dy in 0..width {
                    self.set(x + dx, y + dy, c);
                }
            }
        }
    }

    fn text(&mut self, x: usize, y: usize, s: &str, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let glyph = font8x8::legacy::BASIC_LEGACY[(ch as usize).min(127)];
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        self.set((x + i * 8 + col) as i64, (y + row) as i64, c);
                    }
                }
            }
        }
    }
}

/// Writes the plot of `series` (latencies in microseconds) to `path`.
pub fn latency_png(
    path: &Path,
    title: &str,
    series: &[(String, Histogram<u64>)],
) -> anyhow::Result<()> {
    let mut c = Canvas::new();
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let max_nines = 4.0;
    let (ymin, ymax) = (-2.0f64, 3.0f64); // 0.01 ms .. 1000 ms
    let to_x = |nines: f64| LEFT as f64 + pw * (nines / max_nines);
    let to_y = |ms: f64| {
        TOP as f64 + ph * (1.0 - ((ms.max(1e-3).log10() - ymin) / (ymax - ymin)).clamp(0.0, 1.0))
    };
    let grey = [200, 200, 200];
    let black = [0, 0, 0];
    for (nines, label) in [
        (0.0, "0%"),
        (0.301, "50%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
    ] {
        let x = to_x(nines);
        c.line((x, TOP as f64), (x, TOP as f64 + ph), grey, 1);
        c.text(
            (x as usize).saturating_sub(label.len() * 4),
            H - BOTTOM + 10,
            label,
            black,
        );
    }
    for (ms, label) in [
        (0.01, "0.01"),
        (0.1, "0.1"),
        (1.0, "1"),
        (10.0, "10"),
        (100.0, "100"),
        (1000.0, "1000"),
    ] {
        let y = to_y(ms);
        c.line((LEFT as f64, y), (LEFT as f64 + pw, y), grey, 1);
        c.text(
            LEFT.saturating_sub(label.len() * 8 + 8),
            y as usize - 4,
            label,
            black,
        );
    }
    c.line(
        (LEFT as f64, TOP as f64 + ph),
        (LEFT as f64 + pw, TOP as f64 + ph),
        black,
        1,
    );
    c.line(
        (LEFT as f64, TOP as f64),
        (LEFT as f64, TOP as f64 + ph),
        black,
        1,
    );
    c.text(LEFT, 18, title, black);
    c.text(LEFT + pw as usize / 2 - 40, H - 25, "percentile", black);
    c.text(8, TOP - 20, "latency (ms, log)", black);
    for (i, (name, hist)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut prev = None;
        for step in 0..=400 {
            let nines = max_nines * step as f64 / 400.0;
            let q = 1.0 - 10f64.powf(-nines);
            let point = (
                to_x(nines),
                to_y(hist.value_at_quantile(q.min(0.99999)) as f64 / 1000.0),
            );
            if let Some(p) = prev {
                c.line(p, point, color, 2);
            }
            prev = Some(point);
        }
        let ly = TOP + 10 + i * 22;
        c.line(
            ((W - RIGHT + 15) as f64, ly as f64 + 4.0),
            ((W - RIGHT + 40) as f64, ly as f64 + 4.0),
            color,
            3,
        );
        c.text(W - RIGHT + 48, ly, name, black);
    }
    let file = std::fs::File::create(path)?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), W as u32, H as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&c.px)?;
    Ok(())
}
