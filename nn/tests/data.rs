//! Data: the embedded MNIST-10k and its digests, IDX parsing and its errors, CIFAR-10 records, shuffling,
//! padding, random shifts, normalisation, and the prefetching loader thread.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nn::data::{
    check_sha256, parse_idx_images, parse_idx_labels, sha256_hex, Augment, Batch, Dataset, Loader, LoaderConfig,
    MNIST_MEAN, MNIST_STD,
};

/// A fresh directory under the system temp dir, removed on drop (also when an assertion fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let unique = format!("mila-data-{}-{name}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn idx_images(n: usize, rows: usize, cols: usize, pixels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [2051u32, n as u32, rows as u32, cols as u32] {
        b.extend(v.to_be_bytes());
    }
    b.extend_from_slice(pixels);
    b
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [2049u32, labels.len() as u32] {
        b.extend(v.to_be_bytes());
    }
    b.extend_from_slice(labels);
    b
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

fn shipped(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist-10k").join(name)).unwrap()
}

const MNIST10K_FILES: [&str; 4] = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "test-images-idx3-ubyte.gz",
    "test-labels-idx1-ubyte.gz",
];

#[test]
fn embedded_mnist10k_matches_its_readme() {
    let (train, test) = Dataset::mnist10k().unwrap();
    assert_eq!((train.n, test.n), (8000, 2000));
    for d in [&train, &test] {
        assert_eq!((d.channels, d.height, d.width, d.classes), (1, 28, 28, 10));
        assert_eq!(d.images.len(), d.n * 28 * 28);
        assert!(d.labels.iter().all(|&l| l < 10));
    }
    let mut counts = [0usize; 10];
    for &l in train.labels.iter().chain(&test.labels) {
        counts[l as usize] += 1;
    }
    assert_eq!(counts, [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]);
    // Real digits, not zeros: MNIST's mean pixel is about 0.13 of full scale.
    let mean = train.images.iter().map(|&p| p as f64).sum::<f64>() / train.images.len() as f64 / 255.0;
    assert!((0.1..0.16).contains(&mean), "mean pixel {mean}");
}

#[test]
fn mnist10k_copy_on_disk_loads_and_a_flipped_byte_is_rejected() {
    let dir = TempDir::new("digest");
    for name in MNIST10K_FILES {
        dir.write(name, &shipped(name));
    }
    let embedded = Dataset::mnist10k().unwrap();
    assert_eq!(Dataset::mnist10k_from(dir.path()).unwrap(), embedded);
    // The same files through the digest-free IDX path give the same data.
    assert_eq!(Dataset::mnist(dir.path()).unwrap(), embedded);

    let expected = "64c5b81c3e106f13061bbaa16624a3c4d5250e0d8c68ebf0ad3625970804fe5e";
    let mut bytes = shipped("train-images-idx3-ubyte.gz");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    let path = dir.write("train-images-idx3-ubyte.gz", &bytes);
    let e = Dataset::mnist10k_from(dir.path()).unwrap_err().to_string();
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert!(e.contains(expected) && e.contains(&sha256_hex(&bytes)) && e.contains("sha256"), "{e}");

    assert!(check_sha256("intact", &shipped("train-images-idx3-ubyte.gz"), expected).is_ok());
    std::fs::remove_file(&path).unwrap();
    let e = Dataset::mnist10k_from(dir.path()).unwrap_err().to_string();
    assert!(e.contains(&path.display().to_string()), "a missing file is named: {e}");
}

#[test]
fn sha256_hex_is_the_standard_digest() {
    // FIPS 180-2 test vector.
    assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

#[test]
fn bad_idx_files_are_errors_not_panics() {
    let img = idx_images(2, 2, 3, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    assert!(parse_idx_images(&img, "ok").is_ok());
    let err = |r: Result<(Vec<u8>, usize, usize), engine::Error>| r.unwrap_err().to_string();
    let e = err(parse_idx_images(&idx_labels(&[1, 2]), "labels-as-images"));
    assert!(e.contains("labels-as-images") && e.contains("magic") && e.contains("2051"), "{e}");
    let e = err(parse_idx_images(&img[..10], "short"));
    assert!(e.contains("short") && e.contains("header"), "{e}");
    let e = err(parse_idx_images(&img[..img.len() - 1], "cut"));
    assert!(e.contains("cut") && e.contains("11 data bytes") && e.contains("expected 12"), "{e}");
    let e = err(parse_idx_images(&[img.clone(), vec![0]].concat(), "long"));
    assert!(e.contains("long") && e.contains("more than 12"), "{e}");
    assert!(parse_idx_images(&[], "empty").is_err());
    assert!(parse_idx_labels(&img, "images-as-labels").unwrap_err().to_string().contains("2049"));
    // A header declaring 2^32 - 1 images of 2^32 - 1 squared pixels is rejected from the length, without
    // allocating what it declares.
    let mut huge = idx_images(0, 0, 0, &[0; 8]);
    huge[4..16].fill(0xff);
    assert!(parse_idx_images(&huge, "huge").is_err());
    // 65535 * 42009217 * 6700417 is exactly u64::MAX: no overflow when reading one byte past it.
    let max = [2051u32, 65535, 42_009_217, 6_700_417].iter().flat_map(|v| v.to_be_bytes()).collect::<Vec<_>>();
    assert!(parse_idx_images(&max, "max").unwrap_err().to_string().contains("0 data bytes"));
    // Gzip: a cut stream, and a .gz name on raw bytes.
    let gz = gzip(&img);
    assert!(parse_idx_images(&gz[..gz.len() / 2], "cut.gz").unwrap_err().to_string().contains("cut.gz"));
    let e = err(parse_idx_images(&img, "raw-named.gz"));
    assert!(e.contains("raw-named.gz") && e.contains("gzip"), "{e}");

    // Through Dataset::mnist the path is in the message.
    let dir = TempDir::new("bad-idx");
    let labels = idx_labels(&[3, 1]);
    dir.write("t10k-images-idx3-ubyte", &img);
    dir.write("t10k-labels-idx1-ubyte", &labels);
    let bad = dir.write("train-images-idx3-ubyte", &img[..img.len() - 3]);
    dir.write("train-labels-idx1-ubyte", &labels);
    let e = Dataset::mnist(dir.path()).unwrap_err().to_string();
    assert!(e.contains(&bad.display().to_string()), "{e}");
    // Counts that disagree between the two files.
    dir.write("train-images-idx3-ubyte", &img);
    let bad = dir.write("train-labels-idx1-ubyte", &idx_labels(&[3, 1, 4]));
    let e = Dataset::mnist(dir.path()).unwrap_err().to_string();
    assert!(e.contains(&bad.display().to_string()) && e.contains("2 images") && e.contains("3 labels"), "{e}");
    // A label that is no digit.
    let bad = dir.write("train-labels-idx1-ubyte", &idx_labels(&[3, 10]));
    let e = Dataset::mnist(dir.path()).unwrap_err().to_string();
    assert!(e.contains(&bad.display().to_string()) && e.contains("label 10"), "{e}");
}

#[test]
fn raw_and_gzipped_idx_round_trip() {
    let pixels: Vec<u8> = (0..3 * 4 * 5).map(|i| (i * 37 % 256) as u8).collect();
    let (img, lab) = (idx_images(3, 4, 5, &pixels), idx_labels(&[3, 1, 4]));
    let raw = parse_idx_images(&img, "raw").unwrap();
    assert_eq!(raw, (pixels.clone(), 4, 5));
    assert_eq!(parse_idx_images(&gzip(&img), "images.gz").unwrap(), raw);
    assert_eq!(parse_idx_labels(&gzip(&lab), "labels.gz").unwrap(), vec![3, 1, 4]);

    // Full MNIST names (t10k-*), raw and gzipped mixed.
    let dir = TempDir::new("idx");
    dir.write("train-images-idx3-ubyte", &img);
    dir.write("train-labels-idx1-ubyte.gz", &gzip(&lab));
    dir.write("t10k-images-idx3-ubyte.gz", &gzip(&img));
    dir.write("t10k-labels-idx1-ubyte", &lab);
    let (train, test) = Dataset::mnist(dir.path()).unwrap();
    assert_eq!(train, test);
    assert_eq!((train.n, train.channels, train.height, train.width, train.classes), (3, 1, 4, 5, 10));
    assert_eq!(train.images, pixels);
    assert_eq!(train.labels, vec![3, 1, 4]);
    assert_eq!(train.image(1), Some(&pixels[20..40]));
    assert_eq!(train.image(3), None);

    // MNIST-10k names (test-*).
    let dir10k = TempDir::new("idx10k");
    dir10k.write("train-images-idx3-ubyte.gz", &gzip(&img));
    dir10k.write("train-labels-idx1-ubyte.gz", &gzip(&lab));
    dir10k.write("test-images-idx3-ubyte.gz", &gzip(&img));
    dir10k.write("test-labels-idx1-ubyte.gz", &gzip(&lab));
    assert_eq!(Dataset::mnist(dir10k.path()).unwrap(), (train.clone(), test));

    let missing = dir.path().join("missing");
    let e = Dataset::mnist(&missing).unwrap_err().to_string();
    assert!(e.contains(&missing.display().to_string()) && e.contains("train-images-idx3-ubyte"), "{e}");
}

#[test]
fn cifar_records_split_into_labels_and_chw_pixels() {
    let dir = TempDir::new("cifar");
    // Record pixel p of sample s is (s + p) mod 251, so every position is checked, not just a fill value.
    let record = |label: u8, s: usize| {
        let mut r = vec![label];
        r.extend((0..3072).map(|p| ((s + p) % 251) as u8));
        r
    };
    for i in 1..=5usize {
        let recs = [record(i as u8, 2 * i), record(0, 2 * i + 1)].concat();
        dir.write(&format!("data_batch_{i}.bin"), &recs);
    }
    dir.write("test_batch.bin", &record(7, 100));
    let (train, test) = Dataset::cifar10(dir.path()).unwrap();
    assert_eq!((train.n, test.n), (10, 1));
    assert_eq!((train.channels, train.height, train.width, train.classes), (3, 32, 32, 10));
    assert_eq!(train.labels, [1, 0, 2, 0, 3, 0, 4, 0, 5, 0]);
    assert_eq!(train.image(2).unwrap(), &record(2, 4)[1..]);
    assert_eq!(test.labels, [7]);
    assert_eq!(test.image(0).unwrap(), &record(7, 100)[1..]);

    let bad = dir.write("test_batch.bin", &[0u8; 100]);
    let e = Dataset::cifar10(dir.path()).unwrap_err().to_string();
    assert!(e.contains(&bad.display().to_string()) && e.contains("3073"), "{e}");
    let bad = dir.write("test_batch.bin", &record(10, 0));
    let e = Dataset::cifar10(dir.path()).unwrap_err().to_string();
    assert!(e.contains(&bad.display().to_string()) && e.contains("label 10"), "{e}");
    let gone = dir.path().join("data_batch_3.bin");
    std::fs::remove_file(&gone).unwrap();
    let e = Dataset::cifar10(dir.path()).unwrap_err().to_string();
    assert!(e.contains(&gone.display().to_string()), "{e}");
}

fn mnist_part(n: usize) -> Arc<Dataset> {
    Arc::new(Dataset::mnist10k().unwrap().0.subset(0..n).unwrap())
}

fn cfg(shuffle: bool, pad: usize, shift: usize) -> LoaderConfig {
    LoaderConfig { shuffle, augment: Augment { pad, random_shift: shift }, ..LoaderConfig::mnist(64, 5) }
}

#[test]
fn shuffling_is_a_seeded_permutation_per_epoch() {
    let data = mnist_part(300);
    let l = Loader::new(data.clone(), cfg(true, 0, 0)).unwrap();
    let (a, b) = (l.order(0), l.order(1));
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, (0..300).collect::<Vec<_>>());
    assert_ne!(a, (0..300).collect::<Vec<_>>());
    assert_ne!(a, b, "a different epoch gives a different order");
    assert_eq!(a, Loader::new(data.clone(), cfg(true, 0, 0)).unwrap().order(0), "same seed, same order");
    let other_seed = LoaderConfig { seed: 6, ..cfg(true, 0, 0) };
    assert_ne!(a, Loader::new(data.clone(), other_seed).unwrap().order(0));
    assert_eq!(Loader::new(data.clone(), cfg(false, 0, 0)).unwrap().order(3), (0..300).collect::<Vec<_>>());
    // The batches follow the order.
    let labels: Vec<usize> = l.iter(1, 0).flat_map(|batch| batch.labels).collect();
    assert_eq!(labels, b.iter().map(|&i| data.labels[i] as usize).collect::<Vec<_>>());
}

#[test]
fn padding_puts_zeros_around_and_normalises_the_centre() {
    let data = mnist_part(300);
    let l = Loader::new(data.clone(), cfg(false, 2, 0)).unwrap();
    assert_eq!(l.image_shape(), [1, 32, 32]);
    let b = l.batch(0, 0).unwrap();
    assert_eq!(b.shape, [64, 1, 32, 32]);
    assert_eq!(b.images.len(), 64 * 32 * 32);
    let zero = (0.0 - MNIST_MEAN) / MNIST_STD;
    for k in [0, 17, 63] {
        let img = &b.images[k * 1024..(k + 1) * 1024];
        let src = data.image(k).unwrap();
        for y in 0..32 {
            for x in 0..32 {
                let want = if (2..30).contains(&y) && (2..30).contains(&x) {
                    (src[(y - 2) * 28 + (x - 2)] as f32 / 255.0 - MNIST_MEAN) / MNIST_STD
                } else {
                    zero
                };
                assert_eq!(img[y * 32 + x], want, "image {k} at ({y}, {x})");
            }
        }
    }
}

#[test]
fn normalisation_is_per_channel() {
    // 3 channels of 2x3, every byte value present somewhere.
    let n = 50;
    let images: Vec<u8> = (0..n * 18).map(|i| (i * 7 % 256) as u8).collect();
    let data = Arc::new(Dataset::new(images.clone(), vec![0; n], 3, 2, 3, 1).unwrap());
    let (mean, std) = (vec![0.5, 0.25, 0.0], vec![0.2, 0.5, 1.0]);
    let c = LoaderConfig {
        batch_size: n,
        shuffle: false,
        drop_last: false,
        seed: 1,
        mean,
        std,
        augment: Augment::default(),
    };
    let b = Loader::new(data, c.clone()).unwrap().batch(0, 0).unwrap();
    assert_eq!(b.shape, [n, 3, 2, 3]);
    for (i, (&x, &v)) in images.iter().zip(&b.images).enumerate() {
        let ch = i / 6 % 3;
        assert_eq!(v, (x as f32 / 255.0 - c.mean[ch]) / c.std[ch], "element {i}");
    }
}

/// Image `k` of a batch as rows of f32.
fn plane(b: &Batch, k: usize) -> &[f32] {
    let size = b.shape[1] * b.shape[2] * b.shape[3];
    &b.images[k * size..(k + 1) * size]
}

/// The (dy, dx) within `max` such that `shifted`(y, x) = `base`(y + dy, x + dx), `fill` outside `base`.
fn find_shift(base: &[f32], shifted: &[f32], h: usize, w: usize, max: isize, fill: f32) -> Option<(isize, isize)> {
    let at = |y: isize, x: isize| {
        if (0..h as isize).contains(&y) && (0..w as isize).contains(&x) {
            base[y as usize * w + x as usize]
        } else {
            fill
        }
    };
    (-max..=max)
        .flat_map(|dy| (-max..=max).map(move |dx| (dy, dx)))
        .find(|&(dy, dx)| (0..h).all(|y| (0..w).all(|x| shifted[y * w + x] == at(y as isize + dy, x as isize + dx))))
}

#[test]
fn random_shift_translates_the_padded_image_within_bounds() {
    let data = mnist_part(300);
    let base = Loader::new(data.clone(), cfg(false, 2, 0)).unwrap().batch(0, 1).unwrap();
    let zero = (0.0 - MNIST_MEAN) / MNIST_STD;
    let l = Loader::new(data.clone(), cfg(false, 2, 2)).unwrap();
    let shifted = l.batch(0, 1).unwrap();
    assert_eq!(shifted.shape, base.shape);
    let mut seen = HashSet::new();
    for k in 0..64 {
        let (a, s) = (plane(&base, k), plane(&shifted, k));
        let d = find_shift(a, s, 32, 32, 2, zero);
        assert!(d.is_some(), "image {k} is not the padded image moved by at most 2 pixels");
        seen.insert(d.unwrap());
        // MNIST digits keep a 4-pixel blank border, so a shift of 2 loses none of their pixels.
        let mut va: Vec<u32> = a.iter().map(|v| v.to_bits()).collect();
        let mut vs: Vec<u32> = s.iter().map(|v| v.to_bits()).collect();
        va.sort();
        vs.sort();
        assert_eq!(va, vs, "image {k} keeps every pixel value");
    }
    assert!(seen.len() > 10, "64 images drew only the shifts {seen:?} of 25");
    // Another epoch, another draw; the same epoch, the same draw.
    assert_ne!(l.batch(1, 1).unwrap().images, shifted.images);
    assert_eq!(l.batch(0, 1).unwrap(), shifted);
}

#[test]
fn random_shift_at_the_edges_of_small_images() {
    // 3x5 images with no blank border, shifted by up to 3 and up to 7 (more than the image): every output is
    // still a translation within the bound, with zeros filling in.
    let n = 40;
    let images: Vec<u8> = (0..n * 15).map(|i| (i % 255 + 1) as u8).collect();
    let data = Arc::new(Dataset::new(images, vec![0; n], 1, 3, 5, 1).unwrap());
    for (pad, shift) in [(0, 3), (1, 7)] {
        let plain = LoaderConfig {
            batch_size: n,
            shuffle: false,
            drop_last: false,
            seed: 9,
            mean: vec![0.0],
            std: vec![1.0],
            augment: Augment { pad, random_shift: 0 },
        };
        let moved = LoaderConfig { augment: Augment { pad, random_shift: shift }, ..plain.clone() };
        let base = Loader::new(data.clone(), plain).unwrap().batch(0, 0).unwrap();
        let b = Loader::new(data.clone(), moved).unwrap().batch(0, 0).unwrap();
        let (h, w) = (3 + 2 * pad, 5 + 2 * pad);
        assert_eq!(b.shape, [n, 1, h, w]);
        let mut seen = HashSet::new();
        for k in 0..n {
            let d = find_shift(plane(&base, k), plane(&b, k), h, w, shift as isize, 0.0);
            assert!(d.is_some(), "pad {pad} shift {shift}: image {k} is no translation within bounds");
            seen.insert(d.unwrap());
        }
        assert!(seen.len() > 5, "pad {pad} shift {shift}: shifts {seen:?}");
    }
}

#[test]
fn threaded_batches_equal_in_thread_batches() {
    let l = Arc::new(Loader::new(mnist_part(300), cfg(true, 2, 2)).unwrap());
    assert_eq!(l.num_batches(), 5);
    let here: Vec<_> = l.iter(3, 1).collect();
    let there = l.spawn(3, 1, 2);
    assert_eq!(there.len(), 4);
    let there: Vec<_> = there.collect();
    assert_eq!(here.len(), 4);
    assert_eq!(here, there);
    assert_eq!(here.iter().map(|b| b.index).collect::<Vec<_>>(), [1, 2, 3, 4]);
    // Resuming at (epoch, batch) gives what the whole epoch had there.
    let whole: Vec<_> = l.iter(3, 0).collect();
    assert_eq!(whole[1..], here[..]);
    assert_eq!(l.batch(3, 2).unwrap(), whole[2]);
    assert_eq!(l.spawn(3, 0, 4).collect::<Vec<_>>(), whole);
    assert_eq!(l.spawn(3, 9, 4).count(), 0);
    assert_eq!(l.iter(3, 9).count(), 0);
    assert!(l.batch(3, 5).is_err());
}

#[test]
fn dropping_the_prefetch_iterator_stops_its_thread() {
    let l = Loader::new(mnist_part(8000), LoaderConfig::mnist(8, 1)).unwrap();
    let mut it = l.spawn(0, 0, 2);
    assert_eq!(it.next().unwrap().index, 0);
    // The drop joins the thread, which is blocked sending batch 3 into the full channel: it must return.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(it);
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(20)).expect("the loader thread did not stop when its receiver was dropped");
}

#[test]
fn drop_last_and_the_number_of_batches() {
    let data = mnist_part(300);
    let keep = Loader::new(data.clone(), cfg(true, 0, 0)).unwrap();
    let sizes: Vec<usize> = keep.iter(0, 0).map(|b| b.labels.len()).collect();
    assert_eq!(sizes, [64, 64, 64, 64, 44]);
    assert_eq!(keep.num_batches(), 5);
    let last = keep.batch(0, 4).unwrap();
    assert_eq!((last.shape, last.images.len()), ([44, 1, 28, 28], 44 * 784));

    let drop = Loader::new(data.clone(), LoaderConfig { drop_last: true, ..cfg(true, 0, 0) }).unwrap();
    assert_eq!(drop.num_batches(), 4);
    let batches: Vec<_> = drop.spawn(0, 0, 4).collect();
    assert_eq!(batches.len(), 4);
    assert!(batches.iter().all(|b| b.labels.len() == 64 && b.shape[0] == 64));
    // The kept samples are the first 256 of the epoch's order.
    let labels: Vec<usize> = batches.iter().flat_map(|b| b.labels.clone()).collect();
    assert_eq!(labels, drop.order(0)[..256].iter().map(|&i| data.labels[i] as usize).collect::<Vec<_>>());

    // A batch size that divides n: drop_last changes nothing.
    let even = |drop_last| {
        let c = LoaderConfig { batch_size: 100, drop_last, ..cfg(false, 0, 0) };
        Loader::new(data.clone(), c).unwrap().num_batches()
    };
    assert_eq!((even(false), even(true)), (3, 3));
    // A batch larger than the dataset: one partial batch, or none.
    let big = |drop_last| {
        let c = LoaderConfig { batch_size: 1000, drop_last, ..cfg(false, 0, 0) };
        Loader::new(data.clone(), c).unwrap().num_batches()
    };
    assert_eq!((big(false), big(true)), (1, 0));
}

#[test]
fn bad_loader_inputs_are_errors() {
    let data = mnist_part(10);
    let ok = cfg(true, 0, 0);
    assert!(Loader::new(data.clone(), ok.clone()).is_ok());
    for bad in [
        LoaderConfig { batch_size: 0, ..ok.clone() },
        LoaderConfig { std: vec![0.0], ..ok.clone() },
        LoaderConfig { std: vec![f32::NAN], ..ok.clone() },
        LoaderConfig { mean: vec![0.1, 0.2], ..ok.clone() },
        LoaderConfig { augment: Augment { pad: usize::MAX / 2, random_shift: 0 }, ..ok.clone() },
    ] {
        assert!(Loader::new(data.clone(), bad.clone()).is_err(), "{bad:?}");
    }
    // Inconsistent public fields are caught before they are indexed.
    let short = Dataset { images: data.images[..100].to_vec(), ..(*data).clone() };
    assert!(Loader::new(Arc::new(short), ok.clone()).is_err());
    let beyond = Dataset { labels: vec![9; 10], classes: 9, ..(*data).clone() };
    assert!(beyond.validate().is_err());
    let empty = data.subset(0..0).unwrap();
    assert!(Loader::new(Arc::new(empty), ok.clone()).is_err());
    assert!(data.subset(5..11).is_err());
    assert!(Dataset::new(vec![0; 5], vec![0; 2], 1, 1, 2, 1).is_err());
}
