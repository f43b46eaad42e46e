// Which CPU kernel runs: the widest the machine supports, unless the environment
// variable ADAMX_CPU_CAPABILITY (default, avx2, avx512) or set_isa asks for a narrower.
#pragma once

#include <string>
#include <vector>

#include "kernel.h"

namespace adamx::cpu {

Isa best_isa();
Isa current_isa();
void set_isa(Isa isa);  // throws if the machine lacks it
const char* isa_name(Isa isa);
Isa isa_from_name(const std::string& name);  // throws on an unknown name
std::vector<std::string> supported_isa_names();

}  // namespace adamx::cpu
