/* Probe guest: how the emulating KVM's cost of clearing and copying memory at CPL 0 depends on
 * the instruction used (the kernel's clear_page/memcpy variants). One marker byte on port 0x3f8
 * before each phase; the runner prints its thread CPU time at each marker. */
static inline void outb(unsigned short p, unsigned char v){ __asm__ volatile("outb %0,%1"::"a"(v),"Nd"(p)); }
#define N (1UL<<20)
void _start(void){
  char *dst=(char*)0x400000, *src=(char*)0x800000;
  for (int round=0; round<2; round++) {
    outb(0x3f8,'b'); { void*d=dst; unsigned long c=N; __asm__ volatile("rep stosb":"+D"(d),"+c"(c):"a"(0):"memory"); }
    outb(0x3f8,'q'); { void*d=dst; unsigned long c=N/8; __asm__ volatile("rep stosq":"+D"(d),"+c"(c):"a"(0):"memory"); }
    outb(0x3f8,'l'); for (unsigned long i=0;i<N/8;i+=8){ unsigned long*p=(unsigned long*)dst+i;
        __asm__ volatile("movq %1,(%0);movq %1,8(%0);movq %1,16(%0);movq %1,24(%0);movq %1,32(%0);movq %1,40(%0);movq %1,48(%0);movq %1,56(%0)"::"r"(p),"r"(0UL):"memory"); }
    outb(0x3f8,'m'); { void*d=dst; const void*s=src; unsigned long c=N; __asm__ volatile("rep movsb":"+D"(d),"+S"(s),"+c"(c)::"memory"); }
    outb(0x3f8,'Q'); { void*d=dst; const void*s=src; unsigned long c=N/8; __asm__ volatile("rep movsq":"+D"(d),"+S"(s),"+c"(c)::"memory"); }
    outb(0x3f8,'L'); for (unsigned long i=0;i<N/8;i+=4){ unsigned long*d=(unsigned long*)dst+i,*s=(unsigned long*)src+i; unsigned long a,b,c2,e;
        __asm__ volatile("movq (%4),%0;movq 8(%4),%1;movq 16(%4),%2;movq 24(%4),%3;movq %0,(%5);movq %1,8(%5);movq %2,16(%5);movq %3,24(%5)":"=&r"(a),"=&r"(b),"=&r"(c2),"=&r"(e):"r"(s),"r"(d):"memory"); }
  }
  outb(0x3f8,'.');
  for(;;) __asm__ volatile("hlt");
}
