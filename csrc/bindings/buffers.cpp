// buffer_cache_info() -> dict; set_buffer_cache_limit(nbytes) -> None; cached_zeros(n, n_threads)
// (see buffers.hpp)
#include "buffers.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <cstring>
#include <map>
#include <mutex>
#include <new>

#if __has_include(<unistd.h>)
#include <unistd.h>
#endif

#include "mars/parallel.hpp"

namespace mars_bindings {

namespace {

// Payloads are kAlign-aligned; the header just before a payload holds the pointer malloc or
// calloc returned and the payload size, so that the capsule's destructor, which only gets the
// payload pointer, can give the block back or free it.
constexpr std::size_t kAlign = 64;
constexpr std::size_t kDefaultLimit = std::size_t{512} << 20;

struct Cache {
  std::mutex mutex;
  std::multimap<std::size_t, char*> free_blocks;  // payload size -> payload
  std::size_t cached_bytes = 0;
  std::size_t limit = kDefaultLimit;
  std::size_t hits = 0;
  std::size_t misses = 0;
};

// Never destroyed: capsules may give blocks back while the interpreter shuts down.
Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

struct Header {
  void* raw;
  std::size_t size;
};

Header header_of(const char* payload) {
  Header h;
  std::memcpy(&h, payload - sizeof(Header), sizeof(Header));
  return h;
}

// A new block with a payload of `size` bytes. Zeroed blocks come from calloc, whose large
// blocks are fresh zero pages the kernel maps on first touch (nothing is written here, so a
// huge request costs no memory until it is used, as with numpy.zeros).
char* allocate(std::size_t size, bool zero) {
  static_assert(sizeof(Header) <= kAlign, "the header fits in the alignment padding");
  if (size > std::numeric_limits<std::size_t>::max() - 2 * kAlign) throw std::bad_alloc();
  void* raw = zero ? std::calloc(1, size + 2 * kAlign) : std::malloc(size + 2 * kAlign);
  if (raw == nullptr) throw std::bad_alloc();
  const auto start = reinterpret_cast<std::uintptr_t>(raw) + kAlign;
  char* payload = reinterpret_cast<char*>((start + kAlign - 1) / kAlign * kAlign);
  const Header h{raw, size};
  std::memcpy(payload - sizeof(Header), &h, sizeof(Header));
  return payload;
}

// A cached payload of exactly `size` bytes, or nullptr.
char* reuse(std::size_t size) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  // The most recently freed block of that size (multimap keeps equal keys in insertion
  // order): its pages are the likeliest to be in the caches and the TLB.
  const auto range = c.free_blocks.equal_range(size);
  if (range.first == range.second) {
    ++c.misses;
    return nullptr;
  }
  const auto it = std::prev(range.second);
  char* payload = it->second;
  c.free_blocks.erase(it);
  c.cached_bytes -= size;
  ++c.hits;
  return payload;
}

// Frees blocks (largest first) until the cache holds at most `bytes`. Lock held.
void shrink_to(Cache& c, std::size_t bytes) {
  while (c.cached_bytes > bytes && !c.free_blocks.empty()) {
    auto last = std::prev(c.free_blocks.end());
    c.cached_bytes -= last->first;
    std::free(header_of(last->second).raw);
    c.free_blocks.erase(last);
  }
}

// The capsule destructor: the block goes back to the cache, or is freed when it would not fit.
void give_back(void* ptr) {
  char* payload = static_cast<char*>(ptr);
  const Header h = header_of(payload);
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    if (c.cached_bytes + h.size <= c.limit) {
      c.free_blocks.emplace(h.size, payload);
      c.cached_bytes += h.size;
      return;
    }
  }
  std::free(h.raw);
}

py::dict cache_info() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  py::dict out;
  out["limit_bytes"] = c.limit;
  out["cached_bytes"] = c.cached_bytes;
  out["cached_blocks"] = c.free_blocks.size();
  out["hits"] = c.hits;
  out["misses"] = c.misses;
  return out;
}

void set_limit(long long nbytes) {
  if (nbytes < 0) {
    throw std::invalid_argument("the buffer cache limit must be >= 0 bytes, got " +
                                std::to_string(nbytes));
  }
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.limit = static_cast<std::size_t>(nbytes);
  shrink_to(c, c.limit);
}

py::array cached_zeros(long long n, int n_threads) {
  n_threads = threads_arg(n_threads);
  if (n < 0) throw std::invalid_argument("n must be >= 0, got " + std::to_string(n));
  return cached_array(py::dtype::of<double>(), {static_cast<py::ssize_t>(n)}, true, n_threads);
}

// Bytes of physical memory (a large fallback when the system does not say).
std::size_t physical_memory() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) return static_cast<std::size_t>(pages) * static_cast<std::size_t>(page);
#endif
  return std::size_t{1} << 44;
}

}  // namespace

py::array cached_array(const py::dtype& dtype, const std::vector<py::ssize_t>& shape, bool zero,
                       int n_threads) {
  // Sizes beyond this machine's memory are a MemoryError here, before any allocator sees them
  // (and before size arithmetic could wrap around).
  const std::size_t itemsize = static_cast<std::size_t>(dtype.itemsize());
  const std::size_t ram = physical_memory();
  std::size_t nbytes = itemsize;
  for (py::ssize_t s : shape) {
    if (s == 0) return py::array(dtype, shape);
    if (s < 0 || static_cast<std::size_t>(s) > ram / nbytes) {
      std::string dims;
      for (py::ssize_t d : shape) dims += (dims.empty() ? "" : ", ") + std::to_string(d);
      const std::string msg = "cannot allocate a " + py::str(dtype).cast<std::string>() +
                              " array of shape (" + dims + (shape.size() == 1 ? ",)" : ")") +
                              ": more than this machine's " + std::to_string(ram) +
                              " bytes of memory";
      PyErr_SetString(PyExc_MemoryError, msg.c_str());
      throw py::error_already_set();
    }
    nbytes *= static_cast<std::size_t>(s);
  }
  const std::size_t size = (nbytes + kAlign - 1) / kAlign * kAlign;
  char* payload = reuse(size);
  const bool reused = payload != nullptr;
  if (!reused) payload = allocate(size, zero);
  py::capsule owner(payload, &give_back);  // (gives the block back if what follows throws)
  if (zero && reused) {  // (a new zeroed block is zero already)
    py::gil_scoped_release release;
    mars::parallel::parallel_for(static_cast<std::int64_t>(nbytes), n_threads, 1 << 22,
                                 [&](std::int64_t begin, std::int64_t end) {
      std::memset(payload + begin, 0, static_cast<std::size_t>(end - begin));
    });
  }
  return py::array(dtype, shape, payload, owner);
}

void register_buffers(py::module_& m) {
  m.def("buffer_cache_info", &cache_info,
        "The cache of host blocks behind the large arrays the core returns: limit_bytes, "
        "cached_bytes and cached_blocks (freed blocks kept for reuse), hits and misses.");
  m.def("set_buffer_cache_limit", &set_limit, py::arg("nbytes"),
        "At most nbytes of freed blocks are kept for reuse (default 512 MiB); blocks beyond it "
        "are freed now. 0 frees every cached block and turns the cache off.");
  m.def("cached_zeros", &cached_zeros, py::arg("n"), py::arg("n_threads") = 0,
        "A zero-filled float64 array of n values from the buffer cache (the zeros written on "
        "n_threads threads).");
}

}  // namespace mars_bindings
