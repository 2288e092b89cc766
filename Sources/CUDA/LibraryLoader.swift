import CCUDA

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Finds and opens a shared library with dlopen, trying places in a fixed order and remembering
/// every place it tried, so that a failure can say what was looked for and where.
struct LibraryLoader {
    /// What the library is, for messages ("the CUDA driver", "NVRTC").
    var what: String
    /// An environment variable naming the library file (or a folder holding it), tried first.
    var environmentVariable: String
    /// File names, newest first (`libnvrtc.so.13`, `libnvrtc.so.12`, ...).
    var fileNames: [String]
    /// Folders to look in, in order, before the dynamic loader's own search.
    var folders: [String]
    /// Folders to look in after the dynamic loader's search (Python's site-packages and the like).
    var fallbackFolders: [String]

    struct Opened {
        var handle: UnsafeMutableRawPointer
        var path: String
    }

    func open() throws(CUDAError) -> Opened {
        var tried: [String] = []
        var candidates: [String] = []
        if let value = environment(environmentVariable), !value.isEmpty {
            if isDirectory(value) {
                candidates += fileNames.map { value + "/" + $0 }
            } else {
                candidates.append(value)
            }
        }
        for folder in folders { candidates += fileNames.map { folder + "/" + $0 } }
        candidates += fileNames  // the dynamic loader's own search (LD_LIBRARY_PATH, ld.so.cache)
        for folder in fallbackFolders { candidates += fileNames.map { folder + "/" + $0 } }

        var lastError = ""
        for candidate in candidates {
            if candidate.contains("/") && !fileExists(candidate) {
                tried.append(candidate + " (absent)")
                continue
            }
            if let handle = dlopen(candidate, RTLD_NOW | RTLD_LOCAL) {
                return Opened(handle: handle, path: resolvedPath(handle: handle, fallback: candidate))
            }
            let reason = dlerror().map { String(cString: $0) } ?? "unknown dlopen error"
            lastError = reason
            tried.append(candidate + " (" + reason + ")")
        }
        let list = tried.joined(separator: "\n  ")
        throw CUDAError(
            domain: .library, code: 0, name: "library not found", call: "dlopen",
            message: """
                could not load \(what). Set \(environmentVariable) to the library's path, or install it. \
                Tried, in order:
                  \(list)
                """ + (lastError.isEmpty ? "" : "\nLast dlopen error: \(lastError)"))
    }

    /// Resolves one function by trying its versioned names in order (`cuMemAlloc_v2`, then `cuMemAlloc`).
    static func symbol<Function>(
        _ handle: UnsafeMutableRawPointer, _ names: [String], as type: Function.Type, library: String
    ) throws(CUDAError) -> Function {
        for name in names {
            if let pointer = dlsym(handle, name) {
                return unsafeBitCast(pointer, to: Function.self)
            }
        }
        throw CUDAError(
            domain: .library, code: 0, name: "symbol not found", call: "dlsym",
            message: "\(library) has none of \(names.joined(separator: ", ")); it is too old for this package")
    }

    private func resolvedPath(handle: UnsafeMutableRawPointer, fallback: String) -> String {
        // dladdr on a symbol we know the library exports tells where the loader found it.
        for probe in ["cuInit", "nvrtcVersion"] {
            if let symbol = dlsym(handle, probe), let path = ccuda_path_of_symbol(symbol) {
                return String(cString: path)
            }
        }
        return fallback
    }
}

// MARK: - Small POSIX helpers shared by the layer

/// The value of environment variable `name`, or nil when it is not set.
public func environment(_ name: String) -> String? {
    guard let value = getenv(name) else { return nil }
    return String(cString: value)
}

/// The integer value of environment variable `name` when it is set to one of at least `minimum`; nil
/// otherwise (unset, not a number, or too small: the caller's default then applies).
public func environmentInteger(_ name: String, atLeast minimum: Int) -> Int? {
    guard let value = environment(name).flatMap({ Int($0) }), value >= minimum else { return nil }
    return value
}

func fileExists(_ path: String) -> Bool {
    var status = stat()
    return stat(path, &status) == 0
}

func isDirectory(_ path: String) -> Bool {
    var status = stat()
    return stat(path, &status) == 0 && (status.st_mode & S_IFMT) == S_IFDIR
}

/// Expands a shell pattern (`/usr/lib/python3.*/site-packages`) into the existing paths it names.
func expandGlob(_ pattern: String) -> [String] {
    var result = glob_t()
    defer { globfree(&result) }
    guard glob(pattern, 0, nil, &result) == 0 else { return [] }
    var paths: [String] = []
    for index in 0..<Int(result.gl_pathc) {
        if let path = result.gl_pathv[index] { paths.append(String(cString: path)) }
    }
    return paths.sorted()
}

/// Python's site-packages folders where pip puts NVIDIA's wheels, found without running Python:
/// `PYTHONPATH`, an active virtual environment, the user's and the system's installs, pyenv.
func pythonSitePackages() -> [String] {
    var folders: [String] = []
    if let path = environment("PYTHONPATH") {
        folders += path.split(separator: ":").map(String.init)
    }
    if let venv = environment("VIRTUAL_ENV") {
        folders += expandGlob(venv + "/lib/python3*/site-packages")
    }
    if let home = environment("HOME") {
        folders += expandGlob(home + "/.local/lib/python3*/site-packages")
        folders += expandGlob(home + "/.pyenv/versions/*/lib/python3*/site-packages")
    }
    folders += expandGlob("/opt/*/.venv/lib/python3*/site-packages")
    folders += expandGlob("/usr/local/lib/python3*/site-packages")
    folders += expandGlob("/usr/local/lib/python3*/dist-packages")
    folders += expandGlob("/usr/lib/python3*/site-packages")
    folders += expandGlob("/usr/lib/python3/dist-packages")
    var seen = Set<String>()
    return folders.filter { seen.insert($0).inserted }
}
