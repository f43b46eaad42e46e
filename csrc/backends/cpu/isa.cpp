#include "isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace adamx::cpu {
namespace {

Isa detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
  return Isa::Default;
}

Isa initial() {
  const char* env = std::getenv("ADAMX_CPU_CAPABILITY");
  if (env && *env) {
    const Isa asked = isa_from_name(env);
    if (asked <= best_isa()) return asked;
  }
  return best_isa();
}

std::atomic<Isa>& current() {
  static std::atomic<Isa> isa{initial()};
  return isa;
}

}  // namespace

Isa best_isa() {
  static const Isa best = detect();
  return best;
}

Isa current_isa() { return current().load(std::memory_order_relaxed); }

void set_isa(Isa isa) {
  TORCH_CHECK_VALUE(isa <= best_isa(), "adamx: this CPU does not support ", isa_name(isa),
                    " (best: ", isa_name(best_isa()), ")");
  current().store(isa);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "default";
  }
}

Isa isa_from_name(const std::string& name) {
  for (Isa isa : {Isa::Default, Isa::Avx2, Isa::Avx512})
    if (name == isa_name(isa)) return isa;
  TORCH_CHECK_VALUE(false, "adamx: unknown CPU capability '", name,
                    "'; expected default, avx2 or avx512");
}

std::vector<std::string> supported_isa_names() {
  std::vector<std::string> names;
  for (Isa isa : {Isa::Default, Isa::Avx2, Isa::Avx512})
    if (isa <= best_isa()) names.push_back(isa_name(isa));
  return names;
}

}  // namespace adamx::cpu
