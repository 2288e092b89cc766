#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The calling thread's last message, for `fused_moe_last_error`.
///
/// Kept in a pthread key (not a `@TaskLocal`: C callers have no task) as a `strdup`ed C string,
/// freed when it is replaced and by the key's destructor when the thread exits.
enum LastError {
    /// The key, made once; nil only if the process ran out of pthread keys.
    private static let key: pthread_key_t? = {
        var key = pthread_key_t()
        let result = pthread_key_create(&key) { value in free(value) }
        return result == 0 ? key : nil
    }()

    private static let empty: StaticString = ""
    private static let noStorage: StaticString = "fused_moe: no thread-local storage left for error messages"

    /// Replaces the thread's message.
    static func set(_ message: String) {
        guard let key else { return }
        let previous = pthread_getspecific(key)
        let copy = message.withCString { strdup($0) }
        pthread_setspecific(key, copy)
        free(previous)
    }

    /// Clears the thread's message: what a successful call leaves.
    static func clear() {
        guard let key, let previous = pthread_getspecific(key) else { return }
        pthread_setspecific(key, nil)
        free(previous)
    }

    /// The thread's message, or "" when there is none. Never nil.
    static var current: UnsafePointer<CChar> {
        guard let key else { return cString(noStorage) }
        guard let value = pthread_getspecific(key) else { return cString(empty) }
        return UnsafePointer(value.assumingMemoryBound(to: CChar.self))
    }

    private static func cString(_ string: StaticString) -> UnsafePointer<CChar> {
        UnsafeRawPointer(string.utf8Start).assumingMemoryBound(to: CChar.self)
    }
}
