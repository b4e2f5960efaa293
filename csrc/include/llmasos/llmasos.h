/*
 * llmasos.h - the LLMasOS C SDK: include this one header.
 *
 * Link with -lllmasos -lpthread -lrt.  See heap.h, chan.h and lock.h.
 */
#ifndef LLMASOS_H
#define LLMASOS_H

#include "chan.h"
#include "err.h"
#include "heap.h"
#include "lock.h"

#endif
