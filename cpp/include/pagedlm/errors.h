// Exceptions thrown by the C++ core. The bindings map each to a Python type:
// OutOfBlocks -> pagedlm.OutOfBlocksError (a RuntimeError), UnknownId -> KeyError,
// InvalidArgument -> ValueError. Messages name the offending argument.
#pragma once

#include <stdexcept>
#include <string>

namespace pagedlm {

// Not enough free (or evictable) blocks to complete the call; nothing was changed.
struct OutOfBlocks : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A sequence id that the block manager does not know.
struct UnknownId : std::out_of_range {
  using std::out_of_range::out_of_range;
};

struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

}  // namespace pagedlm
