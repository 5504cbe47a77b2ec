//! What a running process is, from what it is made of — never from its name.
//!
//! - Go: the executable's `.go.buildinfo` section, or (if section headers were
//!   removed) the `\xff Go buildinf:` magic in a writable load segment; the Go
//!   version is read from the build info. Works on `-s -w` stripped binaries.
//! - JVM, Python, Node: their runtime library mapped (`libjvm.so`,
//!   `libpython*.so`, `libnode.so`), or the executable exporting the runtime's
//!   embedding API (`JNI_CreateJavaVM`, `Py_Initialize`, `napi_module_register`)
//!   when the runtime is linked in statically.
//! - OpenSSL: `libcrypto.so` mapped (its DRBG is per process and cloned by a fork).

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Classes of clone-sensitive runtimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A Go program: `runtime.rand` (and `math/rand`'s seed) are per process.
    Go,
    /// A Java virtual machine.
    Jvm,
    /// A Python interpreter.
    Python,
    /// Node.js.
    Node,
    /// A program using OpenSSL's libcrypto.
    Openssl,
    /// Nothing recognized.
    Native,
}

impl Class {
    /// The class's name in the API.
    pub fn name(self) -> &'static str {
        match self {
            Class::Go => "go",
            Class::Jvm => "jvm",
            Class::Python => "python",
            Class::Node => "node",
            Class::Openssl => "openssl",
            Class::Native => "native",
        }
    }
}

/// A classification and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    /// The class.
    pub class: Class,
    /// The runtime's version, when known.
    pub version: String,
    /// What gave it away.
    pub evidence: String,
}

const GO_MAGIC: &[u8; 14] = b"\xff Go buildinf:";
/// Sizes read from an executable are bounded: a hostile binary must not make
/// the agent allocate or scan without limit.
const MAX_SECTION: u64 = 16 << 20;
const MAX_SCAN: u64 = 256 << 20;

/// The parts of an ELF64 little-endian file the detection needs.
struct Elf<'a> {
    file: &'a File,
    sections: Vec<Section>,
    segments: Vec<Segment>,
    shstrtab: Option<usize>,
}

#[derive(Clone, Copy)]
struct Section {
    name: u32,
    kind: u32,
    offset: u64,
    size: u64,
    link: u32,
}

#[derive(Clone, Copy)]
struct Segment {
    kind: u32,
    flags: u32,
    offset: u64,
    filesz: u64,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

impl<'a> Elf<'a> {
    fn parse(file: &'a File) -> Option<Elf<'a>> {
        let mut h = [0u8; 64];
        file.read_exact_at(&mut h, 0).ok()?;
        // ELF, 64-bit, little endian.
        if &h[..4] != b"\x7fELF" || h[4] != 2 || h[5] != 1 {
            return None;
        }
        let (phoff, shoff) = (u64_at(&h, 32), u64_at(&h, 40));
        let (phentsize, phnum) = (u16_at(&h, 54) as u64, u16_at(&h, 56) as u64);
        let (shentsize, shnum, shstrndx) = (
            u16_at(&h, 58) as u64,
            u16_at(&h, 60) as u64,
            u16_at(&h, 62) as usize,
        );
        let table = |off: u64, entsize: u64, n: u64, min: u64| -> Option<Vec<u8>> {
            if n == 0 || entsize < min || entsize * n > MAX_SECTION {
                return None;
            }
            let mut b = vec![0u8; (entsize * n) as usize];
            file.read_exact_at(&mut b, off).ok()?;
            Some(b)
        };
        let sections: Vec<Section> = table(shoff, shentsize, shnum, 64)
            .map(|b| {
                b.chunks(shentsize as usize)
                    .map(|s| Section {
                        name: u32_at(s, 0),
                        kind: u32_at(s, 4),
                        offset: u64_at(s, 24),
                        size: u64_at(s, 32),
                        link: u32_at(s, 40),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let segments: Vec<Segment> = table(phoff, phentsize, phnum, 56)
            .map(|b| {
                b.chunks(phentsize as usize)
                    .map(|p| Segment {
                        kind: u32_at(p, 0),
                        flags: u32_at(p, 4),
                        offset: u64_at(p, 8),
                        filesz: u64_at(p, 32),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let shstrtab = (shstrndx < sections.len()).then_some(shstrndx);
        Some(Elf {
            file,
            sections,
            segments,
            shstrtab,
        })
    }

    fn read(&self, offset: u64, size: u64) -> Option<Vec<u8>> {
        if size > MAX_SECTION {
            return None;
        }
        let mut b = vec![0u8; size as usize];
        self.file.read_exact_at(&mut b, offset).ok()?;
        Some(b)
    }

    fn section(&self, wanted: &str) -> Option<Section> {
        let strtab = self.sections[self.shstrtab?];
        let names = self.read(strtab.offset, strtab.size)?;
        self.sections.iter().copied().find(|s| {
            let start = s.name as usize;
            names
                .get(start..)
                .is_some_and(|n| n.split(|&b| b == 0).next() == Some(wanted.as_bytes()))
        })
    }

    /// Whether the dynamic symbol table defines any of `names`.
    fn exports_any(&self, names: &[&str]) -> Option<String> {
        const SHT_DYNSYM: u32 = 11;
        let dynsym = self.sections.iter().find(|s| s.kind == SHT_DYNSYM)?;
        let strtab = self.sections.get(dynsym.link as usize)?;
        let syms = self.read(dynsym.offset, dynsym.size)?;
        let strs = self.read(strtab.offset, strtab.size)?;
        syms.chunks_exact(24).find_map(|sym| {
            let name_off = u32_at(sym, 0) as usize;
            let defined = u16_at(sym, 6) != 0; // st_shndx != SHN_UNDEF
            let name = strs.get(name_off..)?.split(|&b| b == 0).next()?;
            (defined && names.iter().any(|n| n.as_bytes() == name))
                .then(|| String::from_utf8_lossy(name).into_owned())
        })
    }

    /// The Go build info: from its section, or by its magic in writable segments.
    fn go_buildinfo(&self) -> Option<(Vec<u8>, &'static str)> {
        if let Some(s) = self.section(".go.buildinfo") {
            let b = self.read(s.offset, s.size.min(64 << 10))?;
            if b.starts_with(GO_MAGIC) {
                return Some((b, ".go.buildinfo section"));
            }
        }
        const PT_LOAD: u32 = 1;
        const PF_W: u32 = 2;
        let mut scanned = 0;
        for seg in self
            .segments
            .iter()
            .filter(|p| p.kind == PT_LOAD && p.flags & PF_W != 0)
        {
            let mut off = seg.offset;
            let end = seg.offset + seg.filesz;
            while off < end && scanned < MAX_SCAN {
                let n = (end - off).min(1 << 20);
                let chunk = self.read(off, n)?;
                // The build info is 16-byte aligned in its segment.
                let found = (0..chunk.len().saturating_sub(GO_MAGIC.len()))
                    .step_by(16)
                    .find(|&i| (off + i as u64) % 16 == 0 && chunk[i..].starts_with(GO_MAGIC));
                if let Some(i) = found {
                    let b = self
                        .read(off + i as u64, 64 << 10)
                        .or_else(|| Some(chunk[i..].to_vec()))?;
                    return Some((b, "Go build info magic in a data segment"));
                }
                off += n;
                scanned += n;
            }
        }
        None
    }
}

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// The Go version from build info bytes (Go 1.18+ inline strings; older
/// formats keep pointers and report no version).
pub fn go_version(info: &[u8]) -> Option<String> {
    const FLAGS_INLINE: u8 = 0x2;
    if !info.starts_with(GO_MAGIC) || info.len() < 33 {
        return None;
    }
    if info[15] & FLAGS_INLINE == 0 {
        return Some(String::new());
    }
    let (len, n) = varint(&info[32..])?;
    let start = 32 + n;
    let s = info.get(start..start.checked_add(len as usize)?)?;
    Some(String::from_utf8_lossy(s).into_owned())
}

/// Classifies a process from its executable and its memory map.
pub fn classify(exe: Option<&File>, maps: &str) -> Classification {
    let elf = exe.and_then(Elf::parse);
    if let Some((info, evidence)) = elf.as_ref().and_then(Elf::go_buildinfo) {
        let version = go_version(&info).unwrap_or_default();
        return Classification {
            class: Class::Go,
            version,
            evidence: evidence.into(),
        };
    }
    let mapped = |lib: &str| {
        maps.lines().find_map(|l| {
            let path = l.split_whitespace().nth(5)?;
            let file = path.rsplit('/').next()?;
            file.starts_with(lib).then(|| format!("{file} mapped"))
        })
    };
    let exported = |names: &[&str]| {
        elf.as_ref()
            .and_then(|e| e.exports_any(names))
            .map(|n| format!("executable exports {n}"))
    };
    let runtimes = [
        (Class::Jvm, "libjvm.so", &["JNI_CreateJavaVM"][..]),
        (
            Class::Python,
            "libpython",
            &["Py_Initialize", "_PyRuntime"][..],
        ),
        (Class::Node, "libnode.so", &["napi_module_register"][..]),
    ];
    for (class, lib, symbols) in runtimes {
        if let Some(evidence) = mapped(lib).or_else(|| exported(symbols)) {
            return Classification {
                class,
                version: String::new(),
                evidence,
            };
        }
    }
    if let Some(evidence) = mapped("libcrypto.so") {
        return Classification {
            class: Class::Openssl,
            version: String::new(),
            evidence,
        };
    }
    Classification {
        class: Class::Native,
        version: String::new(),
        evidence: if elf.is_some() {
            "ELF executable, no known runtime".into()
        } else {
            "executable not readable".into()
        },
    }
}

/// Classifies process `pid` of this system.
pub fn classify_pid(pid: u32) -> Classification {
    let exe = File::open(format!("/proc/{pid}/exe")).ok();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    classify(exe.as_ref(), &maps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_version_from_inline_build_info() {
        let mut info = GO_MAGIC.to_vec();
        info.extend_from_slice(&[8, 2]);
        info.resize(32, 0);
        info.push(8);
        info.extend_from_slice(b"go1.19.8");
        assert_eq!(go_version(&info).as_deref(), Some("go1.19.8"));
        info[15] = 0;
        assert_eq!(
            go_version(&info).as_deref(),
            Some(""),
            "pointer format: no version"
        );
        assert_eq!(go_version(b"not go"), None);
        let mut truncated = info.clone();
        truncated[15] = 2;
        truncated.truncate(36);
        assert_eq!(go_version(&truncated), None);
    }

    #[test]
    fn native_and_library_classes() {
        let sh = File::open("/bin/sh").unwrap();
        assert_eq!(classify(Some(&sh), "").class, Class::Native);
        let maps = "7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libcrypto.so.3\n";
        let c = classify(Some(&sh), maps);
        assert_eq!(c.class, Class::Openssl);
        assert!(c.evidence.contains("libcrypto.so.3"));
        let jvm = "7f00-7f01 r-xp 0 08:01 1 /usr/lib/jvm/java-17/lib/server/libjvm.so\n";
        assert_eq!(classify(Some(&sh), jvm).class, Class::Jvm);
        assert_eq!(classify(None, "").class, Class::Native);
        // This very test process: Rust, not Go.
        assert_eq!(classify_pid(std::process::id()).class, Class::Native);
    }

    #[test]
    fn python_is_found_by_what_it_exports_or_maps() {
        let Ok(python) = std::fs::canonicalize("/usr/bin/python3") else {
            eprintln!("no python3 on this host");
            return;
        };
        let f = File::open(&python).unwrap();
        let c = classify(Some(&f), "");
        assert_eq!(c.class, Class::Python, "{c:?}");
    }

    #[test]
    fn garbage_is_native_not_a_panic() {
        let dir = std::env::temp_dir().join(format!("zygote-detect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("junk");
        let mut bytes = b"\x7fELF\x02\x01".to_vec();
        bytes.resize(64, 0xff);
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(
            classify(Some(&File::open(&p).unwrap()), "").class,
            Class::Native
        );
        std::fs::write(&p, b"\x7fELF").unwrap();
        assert_eq!(
            classify(Some(&File::open(&p).unwrap()), "").class,
            Class::Native
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
